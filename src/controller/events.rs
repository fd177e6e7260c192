//! Kubernetes Events (events.k8s.io/v1) for grants, releases, expiries, breaks and
//! rejections, published off the critical path by one task through a bounded queue: a
//! handover never waits for its Event, and a flood of Events is dropped (and counted)
//! rather than slowing grants.
//!
//! Under load Events are sampled: at most `--events-per-lock-per-minute` per Lock (a burst
//! of that many, then that rate); those beyond are counted (`kubelock_events_suppressed_total`)
//! and the next Event published for that Lock says how many were left out. A hot lock then
//! costs a bounded number of Event writes a minute however many grants it makes.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::mpsc;

use crate::{
    planner::{EventKind, PlanEvent},
    telemetry::{ApiLabel, Metrics},
};

/// Events waiting to be published at most.
const QUEUE: usize = 4096;

/// Where reconcilers hand their events.
#[derive(Clone)]
pub struct EventSink {
    tx: mpsc::Sender<(ObjectReference, Option<ObjectReference>, PlanEvent)>,
    metrics: Arc<Metrics>,
    budget: Arc<Mutex<RateBudget>>,
    started: Instant,
}

/// A token bucket per object: `per_minute` Events at once, refilled at `per_minute` a
/// minute. Zero means no bound.
#[derive(Debug)]
pub struct RateBudget {
    per_minute: u32,
    buckets: HashMap<String, Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Duration,
    suppressed: u64,
}

/// Buckets kept at most before full ones (objects quiet for a minute) are forgotten.
const BUCKETS: usize = 10_000;

impl RateBudget {
    pub fn new(per_minute: u32) -> Self {
        Self { per_minute, buckets: HashMap::new() }
    }

    /// Whether an Event about `key` may be published at `now` (any monotonic origin):
    /// `Some(n)` with the `n` Events suppressed since the last one published, or `None`
    /// (suppressed, and counted).
    pub fn admit(&mut self, key: &str, now: Duration) -> Option<u64> {
        if self.per_minute == 0 {
            return Some(0);
        }
        let cap = f64::from(self.per_minute);
        if self.buckets.len() >= BUCKETS && !self.buckets.contains_key(key) {
            let full = |b: &Bucket| b.suppressed == 0 && b.tokens + refill(cap, b.at, now) >= cap;
            self.buckets.retain(|_, b| !full(b));
        }
        let b = self.buckets.entry(key.to_string()).or_insert(Bucket { tokens: cap, at: now, suppressed: 0 });
        b.tokens = (b.tokens + refill(cap, b.at, now)).min(cap);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Some(std::mem::take(&mut b.suppressed))
        } else {
            b.suppressed += 1;
            None
        }
    }
}

fn refill(per_minute: f64, from: Duration, to: Duration) -> f64 {
    to.saturating_sub(from).as_secs_f64() * per_minute / 60.0
}

impl EventSink {
    /// Starts the publishing task.
    pub fn spawn(client: kube::Client, instance: Option<String>, metrics: Arc<Metrics>, per_minute: u32) -> Self {
        let (tx, mut rx) = mpsc::channel::<(ObjectReference, Option<ObjectReference>, PlanEvent)>(QUEUE);
        let reporter = Reporter { controller: crate::api::CONTROLLER_MANAGER.into(), instance };
        let recorder = Recorder::new(client, reporter);
        let task_metrics = metrics.clone();
        tokio::spawn(async move {
            let metrics = task_metrics;
            let mut refused = false;
            while let Some((regarding, related, event)) = rx.recv().await {
                let type_ = match event.kind {
                    EventKind::Granted | EventKind::Released => EventType::Normal,
                    EventKind::Expired | EventKind::Broken | EventKind::Rejected => EventType::Warning,
                };
                let ev = Event {
                    type_,
                    reason: event.kind.as_str().into(),
                    note: Some(truncate(&event.message, 1000)),
                    action: event.reason.as_str().into(),
                    secondary: related,
                };
                match recorder.publish(&ev, &regarding).await {
                    Ok(()) => {
                        if refused {
                            refused = false;
                            metrics.api_unavailable.get_or_create(&ApiLabel { api: "events" }).set(0);
                        }
                    }
                    Err(e) => {
                        metrics.events_dropped.inc();
                        let gone = matches!(&e, kube::Error::Api(s) if s.code == 403 || s.code == 404);
                        if gone && !refused {
                            refused = true;
                            metrics.api_unavailable.get_or_create(&ApiLabel { api: "events" }).set(1);
                            tracing::warn!(error = %e, "the Events API refuses our events; they are dropped (counted in kubelock_events_dropped_total)");
                        } else {
                            tracing::debug!(error = %e, "publishing event");
                        }
                    }
                }
            }
        });
        Self { tx, metrics, budget: Arc::new(Mutex::new(RateBudget::new(per_minute))), started: Instant::now() }
    }

    /// Queues an event about `regarding` (the Lock, or the request when the Lock is gone),
    /// related to `related` (the request).
    pub fn publish(&self, regarding: ObjectReference, related: Option<ObjectReference>, mut event: PlanEvent) {
        let key = regarding.uid.clone().or_else(|| regarding.name.clone()).unwrap_or_default();
        let admitted = self.budget.lock().expect("event budget lock poisoned").admit(&key, self.started.elapsed());
        match admitted {
            None => {
                self.metrics.events_suppressed.inc();
                return;
            }
            Some(0) => {}
            Some(n) => {
                event.message =
                    format!("{} ({n} earlier event(s) about this object not published: rate bound)", event.message);
            }
        }
        if self.tx.try_send((regarding, related, event)).is_err() {
            self.metrics.events_dropped.inc();
        }
    }
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_burst_then_the_rate_per_object() {
        let mut b = RateBudget::new(60);
        let admitted = (0..1000).filter(|_| b.admit("lock-a", Duration::ZERO).is_some()).count();
        assert_eq!(admitted, 60, "the burst is the per-minute figure");
        assert_eq!(b.admit("lock-b", Duration::ZERO), Some(0), "another object has its own budget");
        // One a second afterwards, and the first one says how many were left out.
        assert_eq!(b.admit("lock-a", S), Some(940));
        assert_eq!(b.admit("lock-a", S), None);
        let over_a_minute = (0..6000u32).filter(|i| b.admit("lock-a", S + S * *i / 100).is_some()).count();
        assert!((59..=61).contains(&over_a_minute), "{over_a_minute} in a minute at 60 a minute");
    }

    #[test]
    fn zero_is_no_bound() {
        let mut b = RateBudget::new(0);
        assert!((0..10_000).all(|_| b.admit("x", Duration::ZERO) == Some(0)));
    }

    #[test]
    fn quiet_objects_are_forgotten_when_many() {
        let mut b = RateBudget::new(10);
        for i in 0..BUCKETS {
            b.admit(&i.to_string(), Duration::ZERO);
        }
        b.admit("late", Duration::from_secs(120));
        assert!(b.buckets.len() <= 1, "{} buckets kept", b.buckets.len());
    }
}
