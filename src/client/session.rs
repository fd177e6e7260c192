//! The I/O half of a holder: one task per LockRequest that renews it, watches it and its
//! Lock, keeps the deadline timer on `CLOCK_BOOTTIME`, and publishes the [`Tracker`]'s
//! state on a `tokio::sync::watch` channel. The task stops (and stops renewing) once the
//! state is lost or it is cancelled; it never deletes the request itself.

use std::{future::Future, pin::Pin, time::Duration};

use futures::{StreamExt as _, future::OptionFuture};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::{
    Api, ResourceExt as _,
    api::{Patch, PatchParams},
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{
    clock::{BootInstant, BootTimer},
    tracker::{LockState, LostReason, Tracker},
};
use crate::api::{CLIENT_MANAGER, Lock, LockRequest};

/// The first retry after a failed renewal; doubles up to the renew interval.
const RETRY_MIN: Duration = Duration::from_millis(250);

/// What the task needs.
pub(crate) struct SessionCtx {
    pub requests: Api<LockRequest>,
    pub locks: Api<Lock>,
    pub lock: String,
    pub request_timeout: Duration,
    /// Renew at once when the task starts (an adopted request has no base yet).
    pub renew_now: bool,
    /// Last renewTime written (renewals write strictly increasing values).
    pub last_renew: jiff::Timestamp,
    /// When the write the deadline counts from was sent (the first attempt of the create):
    /// the renewal cadence counts from there too.
    pub last_send: tokio::time::Instant,
}

/// A strictly increasing renewTime: now, or 1µs after the last one.
pub(crate) fn next_renew_time(last: jiff::Timestamp) -> jiff::Timestamp {
    let now = jiff::Timestamp::now();
    let floor = last.checked_add(jiff::SignedDuration::from_micros(1)).unwrap_or(last);
    // MicroTime has microsecond precision: round down so that the stored value is what we compare.
    let now = jiff::Timestamp::from_microsecond(now.as_microsecond()).unwrap_or(now);
    now.max(floor)
}

type Renewal =
    Pin<Box<dyn Future<Output = (BootInstant, tokio::time::Instant, Result<LockRequest, RenewError>)> + Send>>;

#[derive(Debug)]
enum RenewError {
    /// 404, or 409 on the UID precondition: the request is gone.
    Gone,
    Failed(String),
}

/// Runs until the state is lost or `cancel` fires. Always leaves a final state behind:
/// lost, or (when cancelled) whatever it was — the owner then marks it released.
pub(crate) async fn run(
    mut ctx: SessionCtx,
    mut tracker: Tracker,
    tx: std::sync::Arc<watch::Sender<LockState>>,
    cancel: CancellationToken,
) {
    let name = tracker.name().to_string();
    let uid = tracker.uid().to_string();
    let mut timer = match BootTimer::new() {
        Ok(t) => Some(t),
        Err(e) => {
            // Without the timer, the deadline is still enforced by ticks on every wake-up
            // and by readers checking the clock; renewals wake us every lease/3.
            warn!(request = %name, error = %e, "cannot create a CLOCK_BOOTTIME timer; checking the deadline on every wake-up");
            None
        }
    };
    let request_events =
        watcher(ctx.requests.clone(), watcher::Config::default().fields(&format!("metadata.name={name}")))
            .default_backoff();
    let lock_events =
        watcher(ctx.locks.clone(), watcher::Config::default().fields(&format!("metadata.name={}", ctx.lock)))
            .default_backoff();
    tokio::pin!(request_events, lock_events);
    let mut request_listed = false;
    let mut lock_listed = false;
    let mut renewing: Option<Renewal> = None;
    let mut retry = RETRY_MIN;
    // The cadence: lease/3 after the send time of the last successful write. Recomputed on
    // every turn because the interval shrinks once the Lock's or the granted lease is known.
    let mut last_ok_send = ctx.last_send;
    let mut retry_at: Option<tokio::time::Instant> = ctx.renew_now.then(tokio::time::Instant::now);

    loop {
        if let Some(t) = &mut timer
            && let Err(e) = t.set(tracker.deadline())
        {
            warn!(request = %name, error = %e, "arming the deadline timer failed");
        }
        publish(&tx, &tracker);
        if tracker.state().is_lost() {
            break;
        }
        let timer_armed = timer.as_ref().is_some_and(|t| t.armed().is_some());
        let next_renew = retry_at.unwrap_or(last_ok_send + tracker.renew_interval());
        tokio::select! {
            biased;
            // The deadline first: after a freeze or a suspend every branch is ready at once.
            _ = async { timer.as_ref().expect("armed").fired().await }, if timer_armed => {
                tracker.on_tick(BootInstant::now());
            }
            _ = cancel.cancelled() => break,
            Some(done) = OptionFuture::from(renewing.as_mut()) => {
                renewing = None;
                let (sent_at, sent_mono, result) = done;
                let now = BootInstant::now();
                match result {
                    Ok(obj) => {
                        tracker.on_write_ok(sent_at, now, Some(&obj));
                        retry = RETRY_MIN;
                        retry_at = None;
                        last_ok_send = sent_mono;
                    }
                    Err(RenewError::Gone) => tracker.on_request_gone(now),
                    Err(RenewError::Failed(e)) => {
                        tracker.on_tick(now);
                        let wait = retry.min(tracker.renew_interval());
                        warn!(request = %name, error = %e, retry_in = ?wait, "renewal failed");
                        retry = (retry * 2).min(tracker.renew_interval());
                        retry_at = Some(tokio::time::Instant::now() + wait);
                    }
                }
            }
            _ = tokio::time::sleep_until(next_renew), if renewing.is_none() => {
                let renew_time = next_renew_time(ctx.last_renew);
                ctx.last_renew = renew_time;
                retry_at = None;
                renewing = Some(Box::pin(renew(ctx.requests.clone(), name.clone(), uid.clone(), renew_time, ctx.request_timeout)));
            }
            Some(event) = request_events.next() => {
                let now = BootInstant::now();
                match event {
                    Ok(watcher::Event::Init) => request_listed = false,
                    Ok(watcher::Event::InitApply(obj)) | Ok(watcher::Event::Apply(obj)) => {
                        if obj.name_any() == name {
                            request_listed = true;
                            tracker.on_request(&obj, now);
                        }
                    }
                    Ok(watcher::Event::Delete(obj)) => {
                        if obj.uid().as_deref() == Some(uid.as_str()) {
                            tracker.on_request_gone(now);
                        }
                    }
                    Ok(watcher::Event::InitDone) => {
                        if !request_listed {
                            tracker.on_request_gone(now);
                        }
                    }
                    Err(e) => warn!(request = %name, error = %e, "request watch error (retrying)"),
                }
            }
            Some(event) = lock_events.next() => {
                let now = BootInstant::now();
                match event {
                    Ok(watcher::Event::Init) => lock_listed = false,
                    Ok(watcher::Event::InitApply(lock)) | Ok(watcher::Event::Apply(lock)) => {
                        if lock.name_any() == ctx.lock {
                            lock_listed = true;
                            tracker.on_lock(&lock, now);
                        }
                    }
                    Ok(watcher::Event::Delete(lock)) => tracker.on_lock_gone(lock.uid().as_deref(), now),
                    Ok(watcher::Event::InitDone) => {
                        if !lock_listed {
                            tracker.on_lock_gone(None, now);
                        }
                    }
                    Err(e) => warn!(lock = %ctx.lock, error = %e, "lock watch error (retrying)"),
                }
            }
        }
    }
    if let LockState::Lost { reason, token } = tracker.state()
        && *reason != LostReason::Released
    {
        info!(request = %name, lock = %ctx.lock, token = ?token, %reason, "lock lost");
    }
}

/// Publishes the tracker's state if it changed.
fn publish(tx: &watch::Sender<LockState>, tracker: &Tracker) {
    tx.send_if_modified(|current| {
        if current != tracker.state() {
            *current = tracker.state().clone();
            true
        } else {
            false
        }
    });
}

/// One renewal: a merge patch of `spec.renewTime` that names the UID (a request recreated
/// under the same name refuses it). Returns the boot time read before sending.
async fn renew(
    requests: Api<LockRequest>,
    name: String,
    uid: String,
    renew_time: jiff::Timestamp,
    timeout: Duration,
) -> (BootInstant, tokio::time::Instant, Result<LockRequest, RenewError>) {
    let patch = serde_json::json!({
        "metadata": { "uid": uid },
        "spec": { "renewTime": MicroTime(renew_time) },
    });
    let params = PatchParams { field_manager: Some(CLIENT_MANAGER.into()), ..Default::default() };
    let sent_mono = tokio::time::Instant::now();
    let sent_at = BootInstant::now();
    let result = match tokio::time::timeout(timeout, requests.patch(&name, &params, &Patch::Merge(&patch))).await {
        Ok(Ok(obj)) => Ok(obj),
        // 404: deleted. 409, or 422 "metadata.uid: field is immutable": the name now belongs
        // to another request (the UID in the patch acts as a precondition).
        Ok(Err(kube::Error::Api(status)))
            if status.code == 404
                || status.code == 409
                || (status.code == 422 && status.message.contains("metadata.uid")) =>
        {
            Err(RenewError::Gone)
        }
        Ok(Err(e)) => Err(RenewError::Failed(e.to_string())),
        Err(_) => Err(RenewError::Failed(format!("no answer within {timeout:?}"))),
    };
    (sent_at, sent_mono, result)
}
