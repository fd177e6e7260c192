//! What the checker judges ([`check`]), on what [`super::recording`] recorded.
//!
//! Let `o(x)` be the moment the recorder received revision `x`; `o(x) ≥ commit(x)`.
//! 1. **capacity**: in every Lock version, the permits of `status.holders` and
//!    `status.draining` sum to at most `spec.permits`; no request is listed twice.
//! 2. **tokens**, per Lock UID: `fencingToken` never decreases; a grant that appears has a
//!    token above every token issued before (and ≤ `fencingToken`), unique to its request;
//!    per Lock *name*: a grant's token is above every token issued under that name before,
//!    by earlier Locks of the name included (deleted and recreated);
//!    a holder's token never changes; a request is never granted twice; every holder entry
//!    names a request for this Lock with the same permits.
//! 3. **mirror**: a request whose status says `Granted` (token t, lock UID u) was listed with t
//!    in a Lock u version of a lower revision, and that grant had not ended at that revision.
//! 4. **FIFO**: for requests A, B of one Lock with `creationTimestamp(A) < creationTimestamp(B)`
//!    (different seconds: within a second the controller breaks ties by its own watch arrival
//!    order, which no observer can know) and A committed before B: when B is granted (revision
//!    g), A is not waiting at g — created before g, not deleted, not marked released (a waiter
//!    that gave up), not granted, not finished
//!    (Expired/Rejected), asking for no more than the Lock's permits. If both are granted in
//!    the same version, A's token is lower. (The queue is strict FIFO with head-of-line
//!    blocking, so this holds for any permits, not only equal ones.)
//! 5. **progress** (no lost wake-up): at any revision, the queue's head (by creationTimestamp,
//!    then commit order) fits into the *truly* free capacity (spec.permits minus the permits of
//!    holders, draining grants included, except a holder that marked its own release: that
//!    frees its permits at once) and no
//!    lock delay is in force — "stalled". A stall may last at most `bounds.stall`, not counting
//!    the time excused by faults: no controller running for at least `controller_startup`, or
//!    the API server/etcd down (until ready + `control_plane_recovery`, which covers the
//!    clients' and controllers' watch back-off).
//! 6. **expiry is never early**: a grant the controller ended while its request still existed
//!    ended no earlier than the holder's `not_before` (`o(end) ≥ not_before`; since
//!    `o(end) ≥ commit(end)` a violation is certain).
//! 7. **expiry is not late**: a grant whose request stopped renewing is ended by
//!    `lease` after the later of its last renewal (as recorded) and the start of a controller
//!    that then stays up, + `bounds.stall`, not counting control-plane outages.
//! 8. **lock delay**: after an expiry on a Lock with a lock delay, the status says so and no
//!    grant is recorded less than `lockDelay − bounds.observer_lag` later.
//! 9. **acting within the grant**: every interval in which a holder acted ended no later than
//!    the recorder saw the Lock version that ended its grant (the one that lists it neither
//!    in `holders` nor in `draining`: a draining grant's holder may still act) (`to ≤ o(end)`: a holder must never
//!    act after the status without it was committed; `o(end) ≥ commit(end)` makes a violation
//!    certain, observer lag can only hide one). The start is not compared with `o(grant)`: the
//!    holder may see its grant before the recorder does.
//! 10. **exclusion as the holders lived it**: at no instant do the acting intervals of
//!     different grants of a Lock overlap with more permits than `spec.permits` — judged on the
//!     holders' own clock readings alone.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    time::Duration,
};

use super::{
    At,
    recording::{Change, FaultKind, HolderEntry, LockVersion, Log, Record, Report},
    timeline::{names, secs, short, timeline},
};

#[cfg(test)]
mod tests;

/// How long things may take (see the module doc, properties 5, 7 and 8).
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// A stall (or a late expiry) may last this long outside excused time.
    pub stall: Duration,
    /// After a controller is ready (its caches synced; or started, if readiness is not
    /// reported), this long counts as its start-up (the first reconciles).
    pub controller_startup: Duration,
    /// After the API server or etcd is ready again, this long counts as recovery (clients and
    /// controllers reconnect with kube-rs's watch back-off: 0.8 s doubling to 30 s).
    pub control_plane_recovery: Duration,
    /// How much later than the commit the recorder may receive a revision (lock delay only).
    pub observer_lag: Duration,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            stall: Duration::from_secs(10),
            controller_startup: Duration::from_secs(3),
            control_plane_recovery: Duration::from_secs(35),
            observer_lag: Duration::from_millis(100),
        }
    }
}

/// One broken property.
#[derive(Clone, Debug)]
pub struct Violation {
    pub property: &'static str,
    pub at: At,
    pub lock: String,
    pub message: String,
}

/// What a clean check looked at.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub records: usize,
    pub lock_versions: usize,
    /// Grants (Lock UID, token) seen in the store.
    pub grants: usize,
    /// Grants ended by the controller (expiry, pod gone, break) rather than a release.
    pub expiries: usize,
    /// Grants that went through `status.draining` (ended by another party, a break, a pod
    /// gone, a spec change or a Lock recreated, while the holder might still act).
    pub drained: usize,
    /// Pairs of requests whose FIFO order was judged.
    pub fifo_pairs: usize,
    /// Acting intervals reported by holders, and the steps in them.
    pub acted: usize,
    pub steps: u64,
    /// The longest stall outside excused time.
    pub longest_stall: Duration,
    /// Faults by kind.
    pub faults: BTreeMap<&'static str, usize>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let faults: Vec<String> = self.faults.iter().map(|(k, n)| format!("{k}={n}")).collect();
        write!(
            f,
            "{} revisions ({} Lock versions), {} grants ({} ended by the controller, {} drained), {} FIFO pairs, {} acting intervals ({} steps), longest unexcused stall {:.3}s; faults: {}",
            self.records,
            self.lock_versions,
            self.grants,
            self.expiries,
            self.drained,
            self.fifo_pairs,
            self.acted,
            self.steps,
            self.longest_stall.as_secs_f64(),
            if faults.is_empty() { "none".into() } else { faults.join(" ") }
        )
    }
}

/// A failed check: the violations and a readable timeline around the first ones.
#[derive(Debug)]
pub struct Failure {
    pub violations: Vec<Violation>,
    pub summary: Summary,
    pub timeline: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{} violation(s):", self.violations.len())?;
        for v in self.violations.iter().take(20) {
            writeln!(f, "  [{}] {}: {}", v.property, v.lock, v.message)?;
        }
        if self.violations.len() > 20 {
            writeln!(f, "  ... and {} more", self.violations.len() - 20)?;
        }
        writeln!(f, "checked: {}", self.summary)?;
        write!(f, "timeline (t = seconds since the recording started):\n{}", self.timeline)
    }
}

/// How a grant ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EndKind {
    /// The request was deleted first: a clean release.
    Released,
    /// The controller removed it while the request still existed (expiry, pod gone, break).
    ByController,
    /// The Lock was deleted.
    LockGone,
}

#[derive(Clone, Debug)]
struct Grant {
    lock: String,
    request: String,
    request_uid: String,
    permits: i64,
    token: i64,
    lease: Duration,
    lock_permits: i64,
    granted_rev: u64,
    granted_at: At,
    ended: Option<(u64, At, EndKind)>,
    /// When the recorder saw the last spec change (renewal) of the request before the end.
    last_renewal: At,
}

#[derive(Clone, Debug, Default)]
struct RequestInfo {
    name: String,
    lock: String,
    permits: i64,
    created: i64,
    create_rev: u64,
    pod_ref: bool,
    generation: i64,
    phase: Option<String>,
    token: Option<i64>,
    deleted: Option<(u64, At)>,
    /// The holder marked its own release (`spec.released`): a waiter that gave up, or a
    /// holder done. The first revision that said so.
    released: bool,
    released_rev: Option<u64>,
    final_rev: Option<u64>,
    /// Recorder times of spec changes (generation bumps), creation included.
    spec_changes: Vec<At>,
    /// First revision at which a Lock version listed it.
    granted_rev: Option<u64>,
    granted_token: Option<i64>,
}

/// Per Lock UID, across its versions.
#[derive(Default)]
struct LockTrack {
    prev: Option<LockVersion>,
    issued: i64,
    owner: HashMap<i64, String>,
    granted: HashSet<String>,
}

/// A set of time intervals.
#[derive(Clone, Debug, Default)]
struct Intervals(Vec<(At, At)>);

impl Intervals {
    fn add(&mut self, from: At, to: At) {
        if to > from {
            self.0.push((from, to));
        }
    }

    fn merged(mut self) -> Intervals {
        self.0.sort();
        let mut out: Vec<(At, At)> = Vec::new();
        for (a, b) in self.0 {
            match out.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => out.push((a, b)),
            }
        }
        Intervals(out)
    }

    /// Length of the overlap with `[a, b]`.
    fn overlap(&self, a: At, b: At) -> Duration {
        self.0.iter().map(|(x, y)| (*y).min(b).saturating_sub((*x).max(a))).sum()
    }

    fn contains(&self, t: At) -> bool {
        self.0.iter().any(|(x, y)| *x <= t && t < *y)
    }
}

/// Controller lifetimes `(ready from, killed at)` and the excused time derived from faults.
struct Excuses {
    ready: Vec<(At, At)>,
    control_plane: Intervals,
    all: Intervals,
}

fn excuses(log: &Log, bounds: &Bounds, end: At) -> Excuses {
    let mut starts: BTreeMap<&str, Vec<At>> = BTreeMap::new();
    let mut readies: BTreeMap<&str, Vec<At>> = BTreeMap::new();
    let mut kills: BTreeMap<&str, Vec<At>> = BTreeMap::new();
    let mut control_plane = Intervals::default();
    for f in &log.faults {
        match f.kind {
            FaultKind::ControllerStart => starts.entry(&f.who).or_default().push(f.at),
            FaultKind::ControllerReady => readies.entry(&f.who).or_default().push(f.at),
            FaultKind::ControllerKill => kills.entry(&f.who).or_default().push(f.at),
            FaultKind::ApiServerKill | FaultKind::EtcdKill => {
                control_plane.add(f.at, f.until.map_or(end, |u| u + bounds.control_plane_recovery));
            }
            _ => {}
        }
    }
    // A controller is up from its readiness (caches synced; its start if readiness is not
    // reported) + `controller_startup` until it is killed; never if it is killed first.
    let mut ready = Vec::new();
    for (who, starts) in &starts {
        let kills = kills.get(who).cloned().unwrap_or_default();
        let readies = readies.get(who).cloned();
        for s in starts {
            let killed = kills.iter().copied().filter(|k| k >= s).min().unwrap_or(At::MAX);
            let up = match &readies {
                Some(r) => match r.iter().copied().filter(|r| r >= s && *r < killed).min() {
                    Some(r) => r,
                    None => continue,
                },
                None => *s,
            };
            ready.push((up + bounds.controller_startup, killed));
        }
    }
    // Excused: no controller ready, or the control plane recovering.
    let mut covered = Intervals::default();
    for (a, b) in &ready {
        covered.add(*a, (*b).min(end));
    }
    let covered = covered.merged();
    let mut all = Intervals::default();
    let mut t = log.start;
    for (a, b) in &covered.0 {
        if *a > t {
            all.add(t, *a);
        }
        t = t.max(*b);
    }
    if t < end {
        all.add(t, end);
    }
    for (a, b) in &control_plane.0 {
        all.add(*a, *b);
    }
    Excuses { ready, control_plane: control_plane.merged(), all: all.merged() }
}

/// One interval a holder acted in: from, to, token, permits, who.
type ActingInterval = (At, At, i64, i64, String);

/// Checks everything recorded in `log`; `Err` carries the violations and a timeline.
pub fn check(log: &Log, bounds: &Bounds) -> Result<Summary, Box<Failure>> {
    let mut v: Vec<Violation> = Vec::new();
    let mut summary = Summary { records: log.records.len(), ..Default::default() };
    for f in log.faults.iter().filter(|f| !matches!(f.kind, FaultKind::ControllerStart | FaultKind::ControllerReady)) {
        *summary.faults.entry(f.kind.name()).or_default() += 1;
    }
    let end = log.end.unwrap_or_else(|| log.records.last().map_or(log.start, |r| r.at)).max(log.start);
    let ex = excuses(log, bounds, end);

    let mut records = log.records.clone();
    records.sort_by_key(|r| r.rev);

    // Pass 1: the store's history, version by version.
    let mut requests: HashMap<String, RequestInfo> = HashMap::new();
    let mut tracks: HashMap<String, LockTrack> = HashMap::new();
    let mut grants: BTreeMap<(String, i64), Grant> = BTreeMap::new();
    // Lock name -> current version (for the progress pass).
    let mut stall_state: HashMap<String, (Option<LockVersion>, BTreeSet<String>)> = HashMap::new();
    let mut stalled_since: HashMap<String, (At, u64)> = HashMap::new();
    // (lock name) -> (o(expiry), lock delay) of the last expiry.
    let mut last_expiry: HashMap<String, (At, Duration, u64)> = HashMap::new();
    // Lock name -> the highest token issued under it, by any Lock of that name.
    let mut by_name: HashMap<String, i64> = HashMap::new();

    for rec in &records {
        let (rev, at) = (rec.rev, rec.at);
        let lock_name = match &rec.change {
            Change::Request(r) => {
                let info = requests.entry(r.uid.clone()).or_default();
                let first = info.name.is_empty();
                if first {
                    info.name = r.name.clone();
                    info.lock = r.lock.clone();
                    info.permits = r.permits;
                    info.created = r.created;
                    info.create_rev = if r.create_rev > 0 { r.create_rev } else { rev };
                    info.pod_ref = r.pod_ref;
                    info.spec_changes.push(at);
                } else if r.generation != info.generation {
                    info.spec_changes.push(at);
                }
                info.generation = r.generation;
                if r.released && !info.released {
                    info.released = true;
                    info.released_rev = Some(rev);
                }
                // Only a change of the status is a mirror write (a renewal carries the old one).
                let mirrored = first || info.phase != r.phase || info.token != r.token;
                info.phase = r.phase.clone();
                info.token = r.token;
                if matches!(r.phase.as_deref(), Some("Expired" | "Rejected")) && info.final_rev.is_none() {
                    info.final_rev = Some(rev);
                }
                // 3. mirror
                if mirrored && r.phase.as_deref() == Some("Granted") {
                    let key = (r.lock_uid.clone().unwrap_or_default(), r.token.unwrap_or(-1));
                    match grants.get(&key) {
                        None => v.push(Violation {
                            property: "mirror",
                            at,
                            lock: r.lock.clone(),
                            message: format!(
                                "rev {rev}: request {} says Granted with token {} of lock UID {}, but no Lock version before listed it",
                                r.name, key.1, short(&key.0)
                            ),
                        }),
                        Some(g) if g.request_uid != r.uid => v.push(Violation {
                            property: "mirror",
                            at,
                            lock: r.lock.clone(),
                            message: format!("rev {rev}: request {} says Granted with token {}, which the Lock gave to {}", r.name, key.1, g.request),
                        }),
                        Some(g) if g.ended.is_some_and(|(e, _, _)| e < rev) => v.push(Violation {
                            property: "mirror",
                            at,
                            lock: r.lock.clone(),
                            message: format!(
                                "rev {rev}: request {} says Granted with token {}, but the Lock ended that grant at rev {}",
                                r.name,
                                key.1,
                                g.ended.map_or(0, |e| e.0)
                            ),
                        }),
                        Some(_) => {}
                    }
                }
                stall_state.entry(r.lock.clone()).or_default().1.insert(r.uid.clone());
                r.lock.clone()
            }
            Change::RequestGone { uid, .. } => match requests.get_mut(uid) {
                Some(info) => {
                    info.deleted = Some((rev, at));
                    info.lock.clone()
                }
                None => continue, // created before the recording started
            },
            Change::LockGone { name, uid } => {
                if let Some(track) = tracks.get_mut(uid) {
                    track.prev = None;
                }
                for g in grants.values_mut().filter(|g| g.lock == *name && g.ended.is_none()) {
                    g.ended = Some((rev, at, EndKind::LockGone));
                }
                stall_state.entry(name.clone()).or_default().0 = None;
                name.clone()
            }
            Change::Lock(l) => {
                summary.lock_versions += 1;
                check_lock_version(
                    l,
                    rev,
                    at,
                    &mut tracks,
                    &requests,
                    &mut grants,
                    &mut v,
                    &mut summary,
                    &mut last_expiry,
                    &mut by_name,
                    &ex.control_plane,
                );
                stall_state.entry(l.name.clone()).or_default().0 = Some(l.clone());
                for h in &l.holders {
                    if let Some(info) = requests.get_mut(&h.request_uid)
                        && info.granted_rev.is_none()
                    {
                        info.granted_rev = Some(rev);
                        info.granted_token = Some(h.token);
                    }
                }
                l.name.clone()
            }
        };
        // 5. progress: is the Lock stalled after this revision?
        if let Some((Some(lock), uids)) = stall_state.get(&lock_name) {
            let stalled = is_stalled(lock, uids, &requests);
            match (stalled, stalled_since.get(&lock_name).copied()) {
                (true, None) => {
                    stalled_since.insert(lock_name.clone(), (at, rev));
                }
                (false, Some((since, since_rev))) => {
                    stalled_since.remove(&lock_name);
                    judge_stall(&lock_name, since, since_rev, at, Some(rev), &ex, bounds, &mut v, &mut summary);
                }
                _ => {}
            }
        } else if let Some((since, since_rev)) = stalled_since.remove(&lock_name) {
            judge_stall(&lock_name, since, since_rev, at, Some(rev), &ex, bounds, &mut v, &mut summary);
        }
    }
    for (lock, (since, since_rev)) in stalled_since {
        judge_stall(&lock, since, since_rev, end, None, &ex, bounds, &mut v, &mut summary);
    }

    // Last renewals before each grant ended.
    for g in grants.values_mut() {
        let stop = g.ended.map_or(end, |(_, at, _)| at);
        if let Some(info) = requests.get(&g.request_uid) {
            g.last_renewal = info
                .spec_changes
                .iter()
                .copied()
                .filter(|t| *t <= stop)
                .max()
                .unwrap_or(g.granted_at)
                .max(g.granted_at);
        } else {
            g.last_renewal = g.granted_at;
        }
    }
    summary.grants = grants.len();
    summary.expiries = grants.values().filter(|g| g.ended.is_some_and(|e| e.2 == EndKind::ByController)).count();

    // 4. FIFO.
    check_fifo(&requests, &grants, &mut v, &mut summary, &records);

    // 6. not before / 9. acted within / 10. exclusion.
    let by_lock_token: HashMap<(String, i64), &Grant> =
        grants.values().map(|g| ((g.lock.clone(), g.token), g)).collect();
    let mut not_before: HashMap<(String, i64), At> = HashMap::new();
    let mut acted: BTreeMap<String, Vec<ActingInterval>> = BTreeMap::new();
    for r in &log.reports {
        match r {
            Report::NotBefore { lock, token, at } => {
                let e = not_before.entry((lock.clone(), *token)).or_insert(*at);
                *e = (*e).max(*at);
            }
            Report::Acted { who, lock, request, token, permits, from, to, steps } => {
                summary.acted += 1;
                summary.steps += steps;
                acted.entry(lock.clone()).or_default().push((*from, *to, *token, *permits, who.clone()));
                match by_lock_token.get(&(lock.clone(), *token)) {
                    None => v.push(Violation {
                        property: "acting",
                        at: *from,
                        lock: lock.clone(),
                        message: format!(
                            "{who} acted with token {token} (request {request}), which no Lock version granted"
                        ),
                    }),
                    Some(g) => {
                        if let Some((rev, end_at, _)) = g.ended
                            && *to > end_at
                        {
                            v.push(Violation {
                                property: "acting",
                                at: *to,
                                lock: lock.clone(),
                                message: format!(
                                    "{who} (token {token}) acted until t={}, {:.3}s after the recorder saw rev {rev} end its grant (t={})",
                                    secs(*to, log.start),
                                    (*to - end_at).as_secs_f64(),
                                    secs(end_at, log.start)
                                ),
                            });
                        }
                    }
                }
            }
            _ => {}
        }
    }
    for ((lock, token), nb) in &not_before {
        if let Some(g) = by_lock_token.get(&(lock.clone(), *token))
            && let Some((rev, end_at, EndKind::ByController)) = g.ended
            && end_at < *nb
        {
            v.push(Violation {
                property: "early-expiry",
                at: end_at,
                lock: lock.clone(),
                message: format!(
                    "rev {rev} ended grant token {token} ({}) at t={}, {:.3}s before its holder's lease ran out (t={})",
                    g.request,
                    secs(end_at, log.start),
                    (*nb - end_at).as_secs_f64(),
                    secs(*nb, log.start)
                ),
            });
        }
    }
    for (lock, intervals) in &acted {
        let permits = grants.values().find(|g| g.lock == *lock).map_or(1, |g| g.lock_permits);
        check_exclusion(lock, intervals, permits, log.start, &mut v);
    }

    // 7. late expiry.
    for g in grants.values() {
        let renewing_to_the_end = g.ended.is_none() && g.last_renewal + g.lease > end;
        let released = g.ended.is_some_and(|e| e.2 != EndKind::ByController);
        if renewing_to_the_end || released {
            continue;
        }
        // The request was deleted later than the last renewal: it was a release after all if
        // the deletion came first (handled above); here it still existed at the end.
        let deadline = expected_expiry(g.last_renewal, g.lease, &ex, end) + bounds.stall;
        let ended_at = g.ended.map_or(end, |e| e.1);
        if ended_at > deadline && (g.ended.is_some() || end > deadline) {
            let gone = requests.get(&g.request_uid).and_then(|i| i.deleted).map(|d| d.1);
            // A request deleted after it stopped renewing was released, not expired, if the
            // deletion came before the deadline.
            if gone.is_some_and(|d| d <= deadline) {
                continue;
            }
            v.push(Violation {
                property: "late-expiry",
                at: deadline,
                lock: g.lock.clone(),
                message: format!(
                    "grant token {} ({}) last renewed at t={} with a {}s lease: expected to end by t={} (controller start-up and control-plane outages allowed for), {}",
                    g.token,
                    g.request,
                    secs(g.last_renewal, log.start),
                    g.lease.as_secs_f64(),
                    secs(deadline, log.start),
                    match g.ended {
                        Some((rev, at, _)) => format!("ended at rev {rev}, t={}", secs(at, log.start)),
                        None => "never ended".into(),
                    }
                ),
            });
        }
    }

    if v.is_empty() {
        Ok(summary)
    } else {
        v.sort_by_key(|x| x.at);
        let timeline = timeline(log, &records, &v);
        Err(Box::new(Failure { violations: v, summary, timeline }))
    }
}

/// Properties 1, 2 (and the lock delay of 8) on one Lock version.
#[allow(clippy::too_many_arguments)]
fn check_lock_version(
    l: &LockVersion,
    rev: u64,
    at: At,
    tracks: &mut HashMap<String, LockTrack>,
    requests: &HashMap<String, RequestInfo>,
    grants: &mut BTreeMap<(String, i64), Grant>,
    v: &mut Vec<Violation>,
    summary: &mut Summary,
    last_expiry: &mut HashMap<String, (At, Duration, u64)>,
    by_name: &mut HashMap<String, i64>,
    recovering: &Intervals,
) {
    let mut bad = |property, message: String| v.push(Violation { property, at, lock: l.name.clone(), message });
    let track = tracks.entry(l.uid.clone()).or_default();
    let held: i64 = l.holders.iter().chain(&l.draining).map(|h| h.permits).sum();
    if held > l.permits {
        bad(
            "capacity",
            format!(
                "rev {rev}: {held} permits held of {} (holders {}; draining {})",
                l.permits,
                names(&l.holders),
                names(&l.draining)
            ),
        );
    }
    let mut listed = HashSet::new();
    for h in l.holders.iter().chain(&l.draining) {
        if !listed.insert(h.request_uid.clone()) {
            bad("capacity", format!("rev {rev}: {} listed twice", h.request));
        }
    }
    let prev = track.prev.take();
    let prev_fencing = prev.as_ref().map_or(0, |p| p.fencing);
    if l.fencing < prev_fencing {
        bad("tokens", format!("rev {rev}: fencingToken went back from {prev_fencing} to {}", l.fencing));
    }
    let before: HashMap<&str, &HolderEntry> =
        prev.as_ref().map(|p| p.holders.iter().map(|h| (h.request_uid.as_str(), h)).collect()).unwrap_or_default();
    // Grants taking permits before this version: holders and draining.
    let taking_before: HashMap<&str, &HolderEntry> = prev
        .as_ref()
        .map(|p| p.holders.iter().chain(&p.draining).map(|h| (h.request_uid.as_str(), h)).collect())
        .unwrap_or_default();
    let draining_before: HashSet<&str> =
        prev.as_ref().map(|p| p.draining.iter().map(|h| h.request_uid.as_str()).collect()).unwrap_or_default();
    let name_issued_before = by_name.get(&l.name).copied().unwrap_or(0);
    for d in &l.draining {
        if !draining_before.contains(d.request_uid.as_str()) {
            summary.drained += 1;
            if !before.contains_key(d.request_uid.as_str()) {
                // A grant of an earlier Lock of this name (deleted and recreated) drains here:
                // it is not over until it leaves this Lock's draining.
                let earlier = grants
                    .values_mut()
                    .find(|g| g.lock == l.name && g.token == d.token && g.request_uid == d.request_uid);
                match earlier {
                    Some(g) => g.ended = None,
                    None if d.token > name_issued_before => bad(
                        "tokens",
                        format!("rev {rev}: {} draining (token {}) without having been a holder", d.request, d.token),
                    ),
                    None => {}
                }
            }
        }
        if let Some(old) = taking_before.get(d.request_uid.as_str())
            && old.token != d.token
        {
            bad(
                "tokens",
                format!("rev {rev}: {}'s token changed from {} to {} when it drained", d.request, old.token, d.token),
            );
        }
    }
    let name_issued = by_name.get(&l.name).copied().unwrap_or(0);
    let issued_before = track.issued.max(prev_fencing);
    let mut new_grant = false;
    for h in &l.holders {
        match before.get(h.request_uid.as_str()) {
            Some(old) if old.token != h.token => {
                bad(
                    "tokens",
                    format!("rev {rev}: {}'s token changed from {} to {} while held", h.request, old.token, h.token),
                );
            }
            Some(_) => {}
            None => {
                new_grant = true;
                if track.granted.contains(&h.request_uid) {
                    bad(
                        "tokens",
                        format!("rev {rev}: {} granted again (token {}) after its grant ended", h.request, h.token),
                    );
                }
                if h.token <= issued_before {
                    bad(
                        "tokens",
                        format!(
                            "rev {rev}: new grant to {} has token {}, not above {issued_before} issued before",
                            h.request, h.token
                        ),
                    );
                }
                if h.token <= name_issued && name_issued > issued_before {
                    bad(
                        "tokens",
                        format!(
                            "rev {rev}: new grant to {} has token {}, not above {name_issued} issued under the name {} before (by an earlier Lock of that name)",
                            h.request, h.token, l.name
                        ),
                    );
                }
                if h.token > l.fencing {
                    bad(
                        "tokens",
                        format!("rev {rev}: {} holds token {} above fencingToken {}", h.request, h.token, l.fencing),
                    );
                }
                if let Some(other) = track.owner.get(&h.token)
                    && *other != h.request_uid
                {
                    bad(
                        "tokens",
                        format!("rev {rev}: token {} issued twice ({} and {})", h.token, short(other), h.request),
                    );
                }
                match requests.get(&h.request_uid) {
                    Some(r) if r.lock != l.name || r.permits != h.permits => bad(
                        "tokens",
                        format!(
                            "rev {rev}: {} granted {} permit(s) of {}, but it asks for {} of {}",
                            h.request, h.permits, l.name, r.permits, r.lock
                        ),
                    ),
                    Some(_) => {}
                    None => bad(
                        "tokens",
                        format!(
                            "rev {rev}: {} (UID {}) granted, but no such request was ever created",
                            h.request,
                            short(&h.request_uid)
                        ),
                    ),
                }
                track.owner.insert(h.token, h.request_uid.clone());
                track.granted.insert(h.request_uid.clone());
                track.issued = track.issued.max(h.token);
                let n = by_name.entry(l.name.clone()).or_default();
                *n = (*n).max(h.token);
                grants.insert(
                    (l.uid.clone(), h.token),
                    Grant {
                        lock: l.name.clone(),
                        request: h.request.clone(),
                        request_uid: h.request_uid.clone(),
                        permits: h.permits,
                        token: h.token,
                        lease: h.lease,
                        lock_permits: l.permits,
                        granted_rev: rev,
                        granted_at: at,
                        ended: None,
                        last_renewal: at,
                    },
                );
            }
        }
    }
    // Grants that ended in this version (listed neither as holder nor as draining any more):
    // released (the holder's own mark, or the request deleted first) or by the controller.
    let mut expired_here = false;
    for (uid, old) in &taking_before {
        if listed.contains(*uid) {
            continue;
        }
        let deleted_first = requests.get(*uid).and_then(|r| r.deleted).is_some_and(|(d, _)| d < rev);
        let marked = requests.get(*uid).is_some_and(|r| r.released);
        let kind = if deleted_first || marked || !requests.contains_key(*uid) {
            EndKind::Released
        } else {
            EndKind::ByController
        };
        expired_here |= kind == EndKind::ByController;
        let key = (l.uid.clone(), old.token);
        let g = if grants.contains_key(&key) {
            grants.get_mut(&key)
        } else {
            // Drained here after its own Lock was deleted.
            grants.values_mut().find(|g| g.lock == l.name && g.token == old.token && g.request_uid == *uid)
        };
        if let Some(g) = g
            && g.ended.is_none()
        {
            g.ended = Some((rev, at, kind));
        }
    }
    // 8. lock delay.
    if expired_here && !l.lock_delay.is_zero() {
        if !l.delayed && l.holders.iter().all(|h| before.contains_key(h.request_uid.as_str())) {
            bad(
                "lock-delay",
                format!(
                    "rev {rev}: a holder was expired but no lock delay is in force ({}s)",
                    l.lock_delay.as_secs_f64()
                ),
            );
        }
        last_expiry.insert(l.name.clone(), (at, l.lock_delay, rev));
    }
    if new_grant && let Some((e_at, delay, e_rev)) = last_expiry.get(&l.name).copied() {
        let gap = at.saturating_sub(e_at);
        // While the control plane recovers, revisions arrive in a batch: their receipt time
        // is not their commit time, so a gap measured across one says nothing.
        let measurable = !recovering.contains(e_at) && !recovering.contains(at);
        if measurable && gap + Duration::from_millis(100) < delay && !expired_here {
            bad(
                "lock-delay",
                format!(
                    "rev {rev}: granted {:.3}s after the expiry at rev {e_rev}, inside the {}s lock delay",
                    gap.as_secs_f64(),
                    delay.as_secs_f64()
                ),
            );
        }
    }
    let _ = summary;
    track.prev = Some(l.clone());
}

/// The queue's head fits into the truly free capacity and no lock delay holds it back.
fn is_stalled(lock: &LockVersion, uids: &BTreeSet<String>, requests: &HashMap<String, RequestInfo>) -> bool {
    if lock.delayed {
        return false;
    }
    // A holder that marked its release frees its permits at once; any other holder, and
    // every draining grant, still takes them (a delete by another party drains, as the one
    // rule says).
    let freed = |uid: &str| requests.get(uid).is_some_and(|r| r.released);
    let held: i64 = lock.holders.iter().filter(|h| !freed(&h.request_uid)).map(|h| h.permits).sum::<i64>()
        + lock.draining.iter().map(|h| h.permits).sum::<i64>();
    let listed: HashSet<&str> = lock.holders.iter().map(|h| h.request_uid.as_str()).collect();
    let head = uids
        .iter()
        .filter_map(|uid| requests.get(uid).map(|r| (uid, r)))
        .filter(|(uid, r)| {
            r.deleted.is_none()
                && !r.released
                && r.final_rev.is_none()
                && r.granted_rev.is_none()
                && !listed.contains(uid.as_str())
                && r.phase.as_deref() != Some("Granted")
                && !r.pod_ref
                && r.permits <= lock.permits
        })
        .min_by_key(|(_, r)| (r.created, r.create_rev, r.name.clone()));
    head.is_some_and(|(_, r)| held + r.permits <= lock.permits)
}

#[allow(clippy::too_many_arguments)]
fn judge_stall(
    lock: &str,
    since: At,
    since_rev: u64,
    until: At,
    until_rev: Option<u64>,
    ex: &Excuses,
    bounds: &Bounds,
    v: &mut Vec<Violation>,
    summary: &mut Summary,
) {
    let length = until.saturating_sub(since);
    let unexcused = length.saturating_sub(ex.all.overlap(since, until));
    summary.longest_stall = summary.longest_stall.max(unexcused);
    if unexcused > bounds.stall {
        v.push(Violation {
            property: "progress",
            at: since + bounds.stall,
            lock: lock.into(),
            message: format!(
                "from rev {since_rev} the queue's head fitted into free permits and was not granted for {:.3}s ({:.3}s not excused by faults; bound {}s){}",
                length.as_secs_f64(),
                unexcused.as_secs_f64(),
                bounds.stall.as_secs_f64(),
                until_rev.map_or(" until the end of the run".into(), |r| format!(", until rev {r}"))
            ),
        });
    }
}

/// When a grant last renewed at `last` must have been expired at the latest: `lease` after
/// the later of `last` and the readiness of a controller that stays up that long, plus the
/// control-plane outages in between.
fn expected_expiry(last: At, lease: Duration, ex: &Excuses, end: At) -> At {
    let mut best = At::MAX;
    for (ready, killed) in &ex.ready {
        let due = (*ready).max(last) + lease;
        if due <= *killed {
            best = best.min(due);
        }
    }
    if best == At::MAX {
        return end.max(last + lease);
    }
    // Control-plane outages push it back by their length (with recovery).
    let mut due = best;
    for _ in 0..3 {
        due = best + ex.control_plane.overlap(last, due);
    }
    due
}

fn check_fifo(
    requests: &HashMap<String, RequestInfo>,
    grants: &BTreeMap<(String, i64), Grant>,
    v: &mut Vec<Violation>,
    summary: &mut Summary,
    records: &[Record],
) {
    let at_of: HashMap<u64, At> = records.iter().map(|r| (r.rev, r.at)).collect();
    let mut by_lock: HashMap<&str, Vec<&RequestInfo>> = HashMap::new();
    for r in requests.values().filter(|r| !r.name.is_empty()) {
        by_lock.entry(r.lock.as_str()).or_default().push(r);
    }
    let lock_permits: HashMap<&str, i64> = grants.values().map(|g| (g.lock.as_str(), g.lock_permits)).collect();
    for (lock, mut list) in by_lock {
        list.sort_by_key(|r| (r.created, r.create_rev));
        let permits = lock_permits.get(lock).copied().unwrap_or(i64::MAX);
        for b in &list {
            let Some(g) = b.granted_rev else { continue };
            for a in list.iter().take_while(|a| a.created < b.created) {
                if a.create_rev >= b.create_rev || a.pod_ref || a.permits > permits {
                    continue;
                }
                summary.fifo_pairs += 1;
                let granted_by_g = a.granted_rev.is_some_and(|ga| ga <= g);
                if a.granted_rev == Some(g) && a.granted_token > b.granted_token {
                    v.push(Violation {
                        property: "fifo",
                        at: at_of.get(&g).copied().unwrap_or_default(),
                        lock: lock.into(),
                        message: format!(
                            "rev {g}: {} (created {}) got token {:?} above {} (created {}, token {:?}) in the same version",
                            a.name, a.created, a.granted_token, b.name, b.created, b.granted_token
                        ),
                    });
                }
                let waiting = a.create_rev < g
                    && a.deleted.is_none_or(|(d, _)| d > g)
                    && a.released_rev.is_none_or(|r| r > g)
                    && !granted_by_g
                    && a.final_rev.is_none_or(|f| f > g);
                if waiting {
                    v.push(Violation {
                        property: "fifo",
                        at: at_of.get(&g).copied().unwrap_or_default(),
                        lock: lock.into(),
                        message: format!(
                            "rev {g}: {} (created {}s, rev {}) was granted while {} (created {}s, rev {}) was waiting",
                            b.name, b.created, b.create_rev, a.name, a.created, a.create_rev
                        ),
                    });
                }
            }
        }
    }
}

fn check_exclusion(
    lock: &str,
    intervals: &[(At, At, i64, i64, String)],
    permits: i64,
    start: At,
    v: &mut Vec<Violation>,
) {
    // Sweep: +permits at `from`, −permits after `to` (closed intervals: ends sort after starts
    // at the same instant, so touching intervals count as overlapping).
    let mut points: Vec<(At, i32, i64, usize)> = Vec::new();
    for (i, (from, to, _, p, _)) in intervals.iter().enumerate() {
        points.push((*from, 0, *p, i));
        points.push((*to, 1, -*p, i));
    }
    points.sort();
    let mut sum = 0;
    let mut active: BTreeSet<usize> = BTreeSet::new();
    for (t, kind, delta, i) in points {
        sum += delta;
        if kind == 0 {
            active.insert(i);
        } else {
            active.remove(&i);
        }
        if sum > permits {
            let who: Vec<String> =
                active.iter().map(|j| format!("{} token {}", intervals[*j].4, intervals[*j].2)).collect();
            v.push(Violation {
                property: "exclusion",
                at: t,
                lock: lock.into(),
                message: format!(
                    "at t={} holders acted at the same time with {sum} permits of {permits}: {}",
                    secs(t, start),
                    who.join(", ")
                ),
            });
            return;
        }
    }
}
