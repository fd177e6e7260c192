//! The history of one Lock's status as a watch sees it, and the safety checks on it:
//! granted permits never exceed `spec.permits`, and fencing tokens are unique and strictly
//! increasing in grant order for each Lock UID.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    sync::{Arc, Mutex},
};

use futures::StreamExt as _;
use kube::{
    Api, ResourceExt as _,
    runtime::{WatchStreamExt as _, watcher},
};
use kubelock::api::Lock;
use tokio::{task::JoinHandle, time::Instant};

/// One observed status.
#[derive(Clone, Debug)]
pub struct Observed {
    pub at: Instant,
    pub uid: String,
    pub resource_version: String,
    pub permits: i32,
    pub fencing_token: i64,
    /// (request, request UID, permits, token)
    pub holders: Vec<(String, String, i32, i64)>,
    pub waiting: i32,
}

/// Records every status of one Lock in the background until dropped.
pub struct LockHistory {
    states: Arc<Mutex<Vec<Observed>>>,
    task: JoinHandle<()>,
    started: Instant,
}

impl Drop for LockHistory {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a clean history showed.
#[derive(Debug, Default)]
pub struct Summary {
    /// Statuses observed.
    pub states: usize,
    /// Distinct grants observed (request UID, token).
    pub grants: usize,
    /// Most permits held at once.
    pub max_held: i32,
}

impl LockHistory {
    /// Starts recording the Lock `name`: every change its watch delivers.
    pub async fn record(api: Api<Lock>, name: &str) -> LockHistory {
        let states: Arc<Mutex<Vec<Observed>>> = Arc::default();
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let mut events = watcher(api, config).default_backoff().boxed();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let sink = states.clone();
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            while let Some(event) = events.next().await {
                let lock = match event {
                    Ok(watcher::Event::Apply(lock) | watcher::Event::InitApply(lock)) => lock,
                    Ok(watcher::Event::InitDone) => {
                        // Listed: every later change is seen.
                        if let Some(tx) = ready.take() {
                            let _ = tx.send(());
                        }
                        continue;
                    }
                    _ => continue,
                };
                let status = lock.status.clone().unwrap_or_default();
                sink.lock().unwrap().push(Observed {
                    at: Instant::now(),
                    uid: lock.uid().unwrap_or_default(),
                    resource_version: lock.resource_version().unwrap_or_default(),
                    permits: lock.spec.permits,
                    fencing_token: status.fencing_token,
                    holders: status
                        .holders
                        .iter()
                        .map(|h| (h.request.clone(), h.request_uid.clone(), h.permits, h.token))
                        .collect(),
                    waiting: status.waiting,
                });
            }
        });
        let _ = ready_rx.await;
        LockHistory { states, task, started: Instant::now() }
    }

    /// A copy of what was recorded so far.
    pub fn states(&self) -> Vec<Observed> {
        self.states.lock().unwrap().clone()
    }

    /// Waits until a recorded status lists `request` as a holder (the watch may trail the
    /// request's own status, which the test saw), then checks as [`LockHistory::check`].
    pub async fn check_after(&self, request: &str) -> Result<Summary, String> {
        crate::support::eventually(
            &format!("the history to record {request}'s grant"),
            crate::support::TIMEOUT,
            || async {
                let seen = self.states().iter().any(|s| s.holders.iter().any(|h| h.0 == request));
                if seen { Ok(()) } else { Err(format!("{} statuses recorded", self.states().len())) }
            },
        )
        .await
        .map_err(|e| e.to_string())?;
        self.check()
    }

    /// Checks the safety properties over everything recorded; `Err` carries a timeline.
    pub fn check(&self) -> Result<Summary, String> {
        let states = self.states();
        let mut summary = Summary { states: states.len(), ..Default::default() };
        let mut problems = Vec::new();
        // Per Lock UID: token -> request UID, highest token granted, fencing seen.
        let mut owner: HashMap<(String, i64), String> = HashMap::new();
        let mut granted: BTreeMap<String, i64> = BTreeMap::new();
        let mut fencing: BTreeMap<String, i64> = BTreeMap::new();
        let mut seen: HashMap<(String, String), i64> = HashMap::new();
        for (i, s) in states.iter().enumerate() {
            let held: i32 = s.holders.iter().map(|h| h.2).sum();
            summary.max_held = summary.max_held.max(held);
            if held > s.permits {
                problems.push(format!("#{i}: {held} permits held of {}", s.permits));
            }
            let last_fencing = fencing.entry(s.uid.clone()).or_insert(0);
            if s.fencing_token < *last_fencing {
                problems.push(format!("#{i}: fencing token went back from {last_fencing} to {}", s.fencing_token));
            }
            *last_fencing = s.fencing_token;
            for (request, request_uid, _, token) in &s.holders {
                if *token > s.fencing_token {
                    problems
                        .push(format!("#{i}: {request} holds token {token} above fencingToken {}", s.fencing_token));
                }
                match owner.get(&(s.uid.clone(), *token)) {
                    Some(other) if other != request_uid => {
                        problems.push(format!("#{i}: token {token} issued twice ({other} and {request_uid})"));
                    }
                    Some(_) => {}
                    None => {
                        owner.insert((s.uid.clone(), *token), request_uid.clone());
                    }
                }
                // A grant seen for the first time must carry a token above all earlier grants.
                match seen.entry((s.uid.clone(), request_uid.clone())) {
                    std::collections::hash_map::Entry::Vacant(first) => {
                        let highest = granted.entry(s.uid.clone()).or_insert(0);
                        if *token <= *highest {
                            problems
                                .push(format!("#{i}: new grant to {request} has token {token}, not above {highest}"));
                        }
                        *highest = (*highest).max(*token);
                        first.insert(*token);
                        summary.grants += 1;
                    }
                    std::collections::hash_map::Entry::Occupied(known) if *known.get() != *token => {
                        problems.push(format!("#{i}: {request}'s token changed while held"));
                    }
                    std::collections::hash_map::Entry::Occupied(_) => {}
                }
            }
        }
        if problems.is_empty() {
            Ok(summary)
        } else {
            Err(format!("{}\n\ntimeline:\n{}", problems.join("\n"), self.timeline(&states)))
        }
    }

    fn timeline(&self, states: &[Observed]) -> String {
        let mut out = String::new();
        for (i, s) in states.iter().enumerate() {
            let holders: Vec<String> = s.holders.iter().map(|h| format!("{}(p{} t{})", h.0, h.2, h.3)).collect();
            let _ = writeln!(
                out,
                "#{i:<4} +{:>8.3}s rv={} uid={} permits={} fencing={} waiting={} holders=[{}]",
                (s.at - self.started).as_secs_f64(),
                s.resource_version,
                &s.uid[..s.uid.len().min(8)],
                s.permits,
                s.fencing_token,
                s.waiting,
                holders.join(", ")
            );
        }
        out
    }
}
