//! Kubernetes Events (events.k8s.io/v1) for grants, releases, expiries, breaks and
//! rejections, published off the critical path by one task through a bounded queue: a
//! handover never waits for its Event, and a flood of Events is dropped (and counted)
//! rather than slowing grants.

use std::sync::Arc;

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
}

impl EventSink {
    /// Starts the publishing task.
    pub fn spawn(client: kube::Client, instance: Option<String>, metrics: Arc<Metrics>) -> Self {
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
        Self { tx, metrics }
    }

    /// Queues an event about `regarding` (the Lock, or the request when the Lock is gone),
    /// related to `related` (the request).
    pub fn publish(&self, regarding: ObjectReference, related: Option<ObjectReference>, event: PlanEvent) {
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
