//! What the checker judges, recorded on one clock ([`At`]):
//! - **The store's history** ([`History::record`]): every committed revision of every Lock and
//!   LockRequest of a namespace, read from etcd's own watch (see [`crate::support::etcd`]), so
//!   it is complete and in commit order even across kube-apiserver and etcd restarts. Each record
//!   carries its etcd revision (a total order of all changes) and the moment the recorder
//!   received it (`at`, on `CLOCK_BOOTTIME`: never earlier than the commit).
//! - **What holders report** ([`Journal::report`]): the grant they saw, the instants at which
//!   they acted as holder (first and last "step"), and, for holders that know their deadline,
//!   the earliest moment the controller may end the grant (`not_before` = the boot time read
//!   before sending the last successful renewal + lease). In-process holders read the clock
//!   directly; `kubelock run` commands are the test binary re-executed, reading the same
//!   `CLOCK_BOOTTIME` (one machine: all readings are comparable).
//! - **Faults** ([`Journal::fault`]): controller starts and kills, API server and etcd outages
//!   (from the kill to ready again), frozen holders, ...

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::Value;
use tokio::{sync::mpsc, task::JoinHandle};

use super::{At, now};
use crate::support::etcd;

/// One version of a Lock as committed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LockVersion {
    pub name: String,
    pub uid: String,
    pub permits: i64,
    pub lock_delay: Duration,
    pub fencing: i64,
    pub holders: Vec<HolderEntry>,
    /// `status.draining`: grants that ended while their holder may still act; they keep
    /// their permits.
    pub draining: Vec<HolderEntry>,
    /// `status.delayedUntil` is set: a lock delay holds back grants.
    pub delayed: bool,
    pub waiting: i64,
}

/// One entry of `status.holders`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HolderEntry {
    pub request: String,
    pub request_uid: String,
    pub permits: i64,
    pub token: i64,
    pub lease: Duration,
}

/// One version of a LockRequest as committed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RequestVersion {
    pub name: String,
    pub uid: String,
    pub lock: String,
    pub permits: i64,
    /// `creationTimestamp`, in seconds.
    pub created: i64,
    /// The revision that created it.
    pub create_rev: u64,
    /// `metadata.generation`: bumped by every spec write (renewals).
    pub generation: i64,
    pub phase: Option<String>,
    pub token: Option<i64>,
    pub lock_uid: Option<String>,
    pub pod_ref: bool,
    /// `spec.released`: the holder's own release mark.
    pub released: bool,
}

/// What one revision changed.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    Lock(LockVersion),
    LockGone { name: String, uid: String },
    Request(RequestVersion),
    RequestGone { name: String, uid: String },
}

/// One committed change, with the moment the recorder received it.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub rev: u64,
    pub at: At,
    pub change: Change,
}

/// What a holder reports.
#[derive(Clone, Debug, PartialEq)]
pub enum Report {
    /// It saw its grant.
    Granted { at: At, who: String, lock: String, request: String, token: i64 },
    /// It acted as holder from `from` to `to` (its first and last step, `steps` in all).
    Acted { who: String, lock: String, request: String, token: i64, permits: i64, from: At, to: At, steps: u64 },
    /// The controller may not end this grant before `at` (last successful renewal sent + lease).
    NotBefore { lock: String, token: i64, at: At },
    /// Free text for the timeline (a loss and its reason, a release, a late step...).
    Note { at: At, who: String, text: String },
}

impl Report {
    pub(super) fn at(&self) -> At {
        match self {
            Report::Granted { at, .. } | Report::NotBefore { at, .. } | Report::Note { at, .. } => *at,
            Report::Acted { from, .. } => *from,
        }
    }
}

/// Kinds of injected faults (and the controller starts the bounds need).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    /// A controller process started (not a fault; needed to excuse start-up time).
    ControllerStart,
    /// A controller's caches are synced (`/readyz` answers 200; not a fault).
    ControllerReady,
    /// A controller SIGKILLed.
    ControllerKill,
    /// More than one controller running at once (`who` says how many), no leader election.
    SplitBrain,
    /// kube-apiserver SIGKILLed; `until` = ready again.
    ApiServerKill,
    /// etcd SIGKILLed; `until` = ready again.
    EtcdKill,
    /// A holder process frozen with SIGSTOP; `until` = SIGCONT.
    HolderFreeze,
    /// An in-process holder's runtime blocked; `until` = running again.
    RuntimePause,
    /// A renewal written with a wall clock skewed by an hour.
    SkewedRenewal,
    /// A burst of requests on one Lock (`who` says how many).
    Burst,
    /// A holder's request deleted by another party.
    OthersDelete,
    /// A holder broken (the annotations `kubelock break` writes).
    Break,
    /// A granted request's `spec.lockName` changed.
    Repoint,
    /// A Lock deleted and created again under its name.
    LockRecreate,
    /// A holder's pod deleted gracefully, on a node no kubelet runs (nothing confirms a stop).
    PodDelete,
    /// A holder's pod deleted by force (grace period 0).
    PodForceDelete,
    /// A holder's pod stopped: its holder stops acting, then the pod's status says Failed, as
    /// a kubelet reports a pod whose containers terminated.
    PodStopped,
}

impl FaultKind {
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::ControllerStart => "controller-start",
            FaultKind::ControllerReady => "controller-ready",
            FaultKind::ControllerKill => "controller-kill",
            FaultKind::SplitBrain => "split-brain",
            FaultKind::ApiServerKill => "apiserver-kill",
            FaultKind::EtcdKill => "etcd-kill",
            FaultKind::HolderFreeze => "holder-freeze",
            FaultKind::RuntimePause => "runtime-pause",
            FaultKind::SkewedRenewal => "skewed-renewal",
            FaultKind::Burst => "burst",
            FaultKind::OthersDelete => "others-delete",
            FaultKind::Break => "break",
            FaultKind::Repoint => "repoint",
            FaultKind::LockRecreate => "lock-recreate",
            FaultKind::PodDelete => "pod-delete",
            FaultKind::PodForceDelete => "pod-force-delete",
            FaultKind::PodStopped => "pod-stopped",
        }
    }
}

/// One injected fault.
#[derive(Clone, Debug, PartialEq)]
pub struct Fault {
    pub kind: FaultKind,
    pub at: At,
    /// The end of an outage or freeze (`None`: it lasted to the end of the run).
    pub until: Option<At>,
    /// Which process or lock.
    pub who: String,
}

/// Everything recorded in a run.
#[derive(Clone, Debug, Default)]
pub struct Log {
    pub start: At,
    pub end: Option<At>,
    pub records: Vec<Record>,
    pub reports: Vec<Report>,
    pub faults: Vec<Fault>,
}

/// A handle to add reports and faults from anywhere (tasks, threads).
#[derive(Clone, Default)]
pub struct Journal {
    log: Arc<Mutex<Log>>,
}

impl Journal {
    pub fn report(&self, report: Report) {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).reports.push(report);
    }

    pub fn fault(&self, kind: FaultKind, at: At, until: Option<At>, who: impl Into<String>) {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).faults.push(Fault { kind, at, until, who: who.into() });
    }

    /// Sets the end of the last fault of this kind and `who` that has none.
    pub fn fault_ended(&self, kind: FaultKind, who: &str, until: At) {
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = log.faults.iter_mut().rev().find(|f| f.kind == kind && f.who == who && f.until.is_none()) {
            f.until = Some(until);
        }
    }

    /// A copy of everything so far.
    pub fn snapshot(&self) -> Log {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn push_records(&self, records: Vec<Record>) {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).records.extend(records);
    }
}

/// The recorder of one namespace's Locks and LockRequests, straight from etcd.
pub struct History {
    pub journal: Journal,
    endpoint: String,
    /// The last revision the recorder received (under the prefix).
    last: Arc<std::sync::atomic::AtomicU64>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for History {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl History {
    /// Starts recording from the store's current revision on.
    pub async fn record(etcd_endpoint: &str, namespace: &str) -> History {
        let from =
            etcd::current_revision(etcd_endpoint).await.unwrap_or_else(|e| panic!("reading etcd's revision: {e}"));
        let journal = Journal::default();
        journal.log.lock().unwrap().start = now();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let watch =
            tokio::spawn(etcd::watch(etcd_endpoint.to_string(), "/registry/kubelock.dev/".into(), from + 1, tx));
        let sink = journal.clone();
        let ns = namespace.to_string();
        let last = Arc::new(std::sync::atomic::AtomicU64::new(from));
        let seen = last.clone();
        let convert = tokio::spawn(async move {
            while let Some(batch) = rx.recv().await {
                let at = now();
                let records: Vec<Record> = batch.events.iter().filter_map(|e| to_record(e, &ns, at)).collect();
                sink.push_records(records);
                if let Some(e) = batch.events.last() {
                    seen.fetch_max(e.revision, std::sync::atomic::Ordering::SeqCst);
                }
            }
        });
        History { journal, endpoint: etcd_endpoint.to_string(), last, tasks: vec![watch, convert] }
    }

    /// Waits until the recorder has received every revision committed before this call: it
    /// writes a marker key under the watched prefix (no resource of the API server) and waits
    /// for the recorder to pass its revision. False if `timeout` passed first.
    pub async fn sync(&self, timeout: Duration) -> bool {
        let key = "/registry/kubelock.dev/~checker-marker";
        let Ok(rev) = etcd::put(&self.endpoint, key, "sync").await else { return false };
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.last.load(std::sync::atomic::Ordering::SeqCst) >= rev {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn to_record(e: &etcd::KeyEvent, ns: &str, at: At) -> Option<Record> {
    let rest = e.key.strip_prefix("/registry/kubelock.dev/")?;
    let (kind, rest) = rest.split_once('/')?;
    let (key_ns, name) = rest.split_once('/')?;
    if key_ns != ns {
        return None;
    }
    let uid_of =
        |v: &Option<Value>| v.as_ref().and_then(|v| v["metadata"]["uid"].as_str()).unwrap_or_default().to_string();
    let change = match (kind, &e.value) {
        ("locks", Some(v)) => Change::Lock(lock_version(v)),
        ("locks", None) => Change::LockGone { name: name.into(), uid: uid_of(&e.prev) },
        ("lockrequests", Some(v)) => Change::Request(request_version(v, e)),
        ("lockrequests", None) => Change::RequestGone { name: name.into(), uid: uid_of(&e.prev) },
        _ => return None,
    };
    Some(Record { rev: e.revision, at, change })
}

fn dur(v: &Value) -> Duration {
    v.as_str().and_then(|s| kubelock::api::duration::parse(s).ok()).unwrap_or_default()
}

/// A Lock as stored, read leniently (a field of the wrong type reads as its default).
pub fn lock_version(v: &Value) -> LockVersion {
    let status = &v["status"];
    LockVersion {
        name: v["metadata"]["name"].as_str().unwrap_or_default().into(),
        uid: v["metadata"]["uid"].as_str().unwrap_or_default().into(),
        permits: v["spec"]["permits"].as_i64().unwrap_or(1),
        lock_delay: dur(&v["spec"]["lockDelay"]),
        fencing: status["fencingToken"].as_i64().unwrap_or(0),
        holders: entries(&status["holders"]),
        draining: entries(&status["draining"]),
        delayed: !status["delayedUntil"].is_null(),
        waiting: status["waiting"].as_i64().unwrap_or(0),
    }
}

/// `status.holders` or `status.draining`, read leniently.
fn entries(v: &Value) -> Vec<HolderEntry> {
    v.as_array()
        .map(|hs| {
            hs.iter()
                .map(|h| HolderEntry {
                    request: h["request"].as_str().unwrap_or_default().into(),
                    request_uid: h["requestUID"].as_str().unwrap_or_default().into(),
                    permits: h["permits"].as_i64().unwrap_or(0),
                    token: h["token"].as_i64().unwrap_or(0),
                    lease: dur(&h["leaseDuration"]),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn request_version(v: &Value, e: &etcd::KeyEvent) -> RequestVersion {
    let status = &v["status"];
    let created = v["metadata"]["creationTimestamp"]
        .as_str()
        .and_then(|t| t.parse::<jiff::Timestamp>().ok())
        .map_or(0, |t| t.as_second());
    // A create has no previous value; later versions keep the create revision we saw first.
    let create_rev = if e.prev.is_none() { e.revision } else { 0 };
    RequestVersion {
        name: v["metadata"]["name"].as_str().unwrap_or_default().into(),
        uid: v["metadata"]["uid"].as_str().unwrap_or_default().into(),
        lock: v["spec"]["lockName"].as_str().unwrap_or_default().into(),
        permits: v["spec"]["permits"].as_i64().unwrap_or(1),
        created,
        create_rev,
        generation: v["metadata"]["generation"].as_i64().unwrap_or(0),
        phase: status["phase"].as_str().map(str::to_string),
        token: status["token"].as_i64(),
        lock_uid: status["lockUID"].as_str().map(str::to_string),
        pod_ref: !v["spec"]["podRef"].is_null(),
        released: v["spec"]["released"].as_bool().unwrap_or(false),
    }
}
