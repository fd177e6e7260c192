//! Model check of kubelock's grant protocol (docs/design.md, "Grant protocol" and "Expiry without
//! trusting clocks") with the `stateright` model checker.
//!
//! **What is modelled.** One Lock in a store with compare-and-swap: every write gives the
//! object a new resourceVersion, and a write that carries an older one fails. The
//! LockRequests: created, renewed (their generation changes), deleted, their status phase
//! mirrored by the controller. Two controllers run at once (split brain) and may crash and
//! restart with empty memory at any step. A reconcile is separate steps (read and plan; CAS
//! `Lock.status`; mirror into the requests), so anything can happen in between and a
//! controller may write from a stale read. A controller expires a holder by its own
//! observations only: per holder, the last generation it saw and how long ago it first saw it;
//! the grant counts as one, a restart starts the countdown again. Three clients request,
//! renew, release, pause (any party may take no step for any number of ticks) and lose their
//! lease. A renewal is sent and lands in separate steps, ticks apart if the network is slow. A
//! client's deadline is the clock reading taken before sending its last answered create or
//! renewal plus lease minus margin; past it the client is lost for good. A client acts as
//! holder only while its last read (of the Lock, or of its own request's status) says granted
//! and its deadline has not passed. Time is a global tick; the lease is 2 ticks and the margin
//! 1.
//!
//! **What it proves.** Every reachable state is checked (the clock runs forever; a mutex with
//! unbounded requests, renewals and controller crashes; a semaphore of 2 with one writer
//! asking for both permits and two readers asking for one, each asking once, no crashes): the
//! permits granted in `Lock.status` never exceed the Lock's; the permits of the clients that
//! *act as holder* never exceed them either, and a client acts only while the Lock lists it,
//! which is what expiry by observation plus the client deadline are for; a write never lowers
//! `fencingToken` nor issues a token that is not above every earlier one. Under fairness
//! stated in the model (controllers react before the clock moves on, renewals arrive within a
//! tick, the waiter renews at every tick, the two other clients ask once, renew at most once
//! and then release or die, at most one controller crash), a waiting request is eventually
//! granted, a writer behind readers included. `stateright` has no fairness of its own and
//! checks `eventually` only on runs that end (a run that loops is not judged), so the liveness
//! scenario is built so that every run ends, and "granted" is kept in the state so that runs
//! that merge agree on it. Variants with one rule broken each fail a property: controllers
//! writing without CAS (a whole status, or a patch), a client ignoring its deadline, a client
//! whose deadline is not final, comparing the client's renewTime with the controller's clock,
//! a countdown that starts only at a renewal.
//!
//! **What the check found.** The client rules as first written are not
//! safe: a waiter whose deadline passed (paused, say) keeps its request; granted meanwhile, it
//! sends a renewal which lands just after a controller read that expires the grant; the answer
//! gives the waiter a fresh deadline, it reads the Lock before the expiry is written, and acts
//! next to its successor. Either rule closes the hole, and both are checked: passing the
//! deadline is final for a waiter too (it must ask again), which is what `Variant::Correct`
//! models; or the controller fences an expiry by marking the request `Expired` with the
//! resourceVersion it read before it writes the Lock, and a client that gets `Expired` in a
//! renewal's answer is lost.
//!
//! **What it does not prove.** Clocks are perfect in the model: a tick is as long for
//! everybody, so clock-rate drift (what the margin is for), suspend and the choice of
//! `CLOCK_BOOTTIME` are outside it; the model is safe even without the margin (checked with
//! one request per client). API-server watch delays appear only as "a party reads later"; a
//! read returns the store as it is, a whole object at once. How the real controller notices a
//! renewal (watch events, requeue at the next expiry) is reduced to "the next read sees the
//! new generation". Lock delay, pods, `kubelock break`, deleting a Lock, rejected requests,
//! cleanup of finished requests and leader election are not modelled, and fencing tokens are
//! tracked only as "is this write based on the current `fencingToken`". The model is a
//! separate description of the protocol, not the Rust planner or client code. Its sizes are
//! small (one Lock, three clients, two controllers, a two-tick lease, one request per client
//! in the semaphore check): a bug that needs more would escape it.
//!
//! Run with `cargo test --test model_check -- --nocapture` to see the state counts and, for
//! the broken variants, their counterexamples.

// The state is a set of per-client arrays indexed in parallel: index loops read best.
#![allow(clippy::needless_range_loop)]

use std::fmt::Write as _;
use std::time::Instant;

use stateright::{Checker, Expectation, HasDiscoveries, Model, Path, Property};

/// Clients in the model.
const CLIENTS: usize = 3;
/// Controllers in the model.
const CONTROLLERS: usize = 2;

/// Which rule of the protocol is deliberately broken, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    /// The protocol, with passing the local deadline final for waiters as well as holders.
    Correct,
    /// The protocol as first written: passing the deadline is final
    /// for a holder, but a waiter keeps its request, and a renewal answered after its
    /// deadline gives it a fresh one.
    WaiterDeadlineOpen,
    /// Passing the deadline is never final: a renewal answered after it restores the hold.
    LateAnswerRevives,
    /// Clients act as holder whenever their last read says granted, deadline or not.
    IgnoreDeadline,
    /// Controllers replace `Lock.status` without the resourceVersion they read.
    BlindWrite,
    /// Controllers merge-patch their changes (grants and removals) into `Lock.status`
    /// without the resourceVersion they read.
    BlindPatch,
    /// The controller expires by comparing the client's renewTime with its own clock.
    TrustRenewTime,
    /// A controller starts a holder's countdown only when it sees a renewal, not at the
    /// grant nor at its own restart.
    CountdownNeedsRenewal,
}

/// Parameters of one model.
#[derive(Clone, Debug)]
struct Config {
    /// `spec.permits` of the Lock.
    permits: u8,
    /// Permits each client asks for.
    wants: [u8; CLIENTS],
    /// Lease in ticks.
    lease: u8,
    /// Client safety margin in ticks.
    margin: u8,
    /// Bounds on what the parties do; `None` fields are unbounded.
    budget: Budget,
    /// Liveness scenario: client 0 is a waiter that requests once, renews at every tick and
    /// never releases; the clock advances only once every controller has caught up (a fresh
    /// reconcile would change nothing) and no renewal is on the wire.
    liveness: bool,
    /// Expire by fencing first: before the Lock write that drops an expired holder, the
    /// controller marks its request `Expired` with the request's resourceVersion from its
    /// read (a renewal that landed since makes that fail, and the plan is dropped), so a
    /// renewal that lands later is answered `Expired`. The other fix, shipped as well.
    fence_expiry: bool,
    /// Also look for the situations the safety argument is about (`sometimes` properties);
    /// a separate, short search, so that the exhaustive one evaluates fewer properties.
    examples: bool,
    /// Merge states that differ only by renaming clients or controllers (counterexamples are
    /// printed with the renaming undone).
    symmetric: bool,
    /// How many ticks each client's wall clock lags (only `TrustRenewTime` looks at it).
    clock_lag: [u8; CLIENTS],
    variant: Variant,
}

#[derive(Clone, Copy, Debug, Default)]
struct Budget {
    /// Requests per client.
    requests: Option<u8>,
    /// Renewals per request.
    renewals: Option<u8>,
    /// Controller crashes, both together.
    crashes: Option<u8>,
}

impl Config {
    /// A mutex; nothing bounded but the model's own size.
    fn mutex() -> Self {
        Config {
            permits: 1,
            wants: [1, 1, 1],
            lease: 2,
            margin: 1,
            budget: Budget::default(),
            liveness: false,
            fence_expiry: false,
            examples: false,
            symmetric: true,
            clock_lag: [0; CLIENTS],
            variant: Variant::Correct,
        }
    }

    /// A semaphore of 2: client 1 is a writer (2 permits), the others readers (1 each).
    fn semaphore() -> Self {
        Config { permits: 2, wants: [1, 2, 1], ..Config::mutex() }
    }

    /// The liveness scenario on this lock: the waiter and two clients that each request once,
    /// renew at most once, and may release or die; one controller crash.
    fn waiter(self) -> Self {
        Config { liveness: true, budget: Budget { requests: Some(1), renewals: Some(1), crashes: Some(1) }, ..self }
    }

    fn with(self, variant: Variant) -> Self {
        Config { variant, ..self }
    }

    /// Each client asks once and the controllers do not crash: enough for the short
    /// counterexamples the broken variants are searched for, and a narrower search.
    fn small(self) -> Self {
        Config { budget: Budget { requests: Some(1), renewals: None, crashes: Some(0) }, ..self }
    }

    /// Without symmetry reduction.
    fn plain(self) -> Self {
        Config { symmetric: false, ..self }
    }

    /// Ticks a client may act, counted from reading its clock before a send that is answered.
    fn hold_ticks(&self) -> u8 {
        self.lease - self.margin
    }

    /// Passing the deadline makes a holder lost for good.
    fn holder_deadline_final(&self) -> bool {
        !matches!(self.variant, Variant::IgnoreDeadline | Variant::LateAnswerRevives)
    }

    /// Passing the deadline makes a waiter lost for good (it must ask again).
    fn waiter_deadline_final(&self) -> bool {
        self.holder_deadline_final() && self.variant != Variant::WaiterDeadlineOpen
    }
}

// ---------------------------------------------------------------------------------------
// State. Time is relative: every timer counts ticks since (or until) something, capped where
// larger values behave alike, so the clock runs forever in a finite state space.
// ---------------------------------------------------------------------------------------

/// Status phase of a LockRequest, written by the controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Phase {
    Pending,
    Granted,
    Expired,
}

/// A LockRequest. A client has at most one at a time; `inc` tells its successive requests
/// apart, like name and UID. The identifiers `inc`, `rv` and `generation` are kept canonical
/// (see `canonicalize`): in a state the current request's are 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Request {
    inc: u8,
    /// resourceVersion.
    rv: u8,
    /// Renewal counter: what changes when `spec.renewTime` is patched.
    generation: u8,
    /// Creation order among the requests present: the FIFO order.
    created: u8,
    /// Controller's clock minus the client's renewTime, in ticks (`TrustRenewTime` only).
    renew_age: u8,
    phase: Phase,
}

/// One entry of `Lock.status.holders` (the permits are the client's, see `Config::wants`).
/// Fencing tokens are not kept: no decision depends on their values, and what the token
/// properties need is tracked by `Plan::fencing_current` and `History`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Holder {
    inc: u8,
}

/// `Lock.status.holders`, by client.
type Holders = [Option<Holder>; CLIENTS];

fn granted(cfg: &Config, holders: &Holders) -> u8 {
    let mut sum = 0;
    for c in 0..CLIENTS {
        if holders[c].is_some() {
            sum += cfg.wants[c];
        }
    }
    sum
}

fn lists(holders: &Holders, client: usize, inc: u8) -> bool {
    matches!(holders[client], Some(h) if h.inc == inc)
}

/// The API server: one Lock and the requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
struct Store {
    /// resourceVersion of the Lock.
    lock_rv: u8,
    holders: Holders,
    requests: [Option<Request>; CLIENTS],
}

impl Store {
    fn request(&self, client: usize, inc: u8) -> Option<Request> {
        match self.requests[client] {
            Some(r) if r.inc == inc => Some(r),
            _ => None,
        }
    }
}

/// What a controller remembers about a holder: the generation it last saw and how many
/// ticks ago it first saw it (capped at the lease: older is just "ran out").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Observation {
    inc: u8,
    generation: u8,
    age: u8,
}

/// `Observation::age` of a holder whose countdown never started (broken variant only).
const NO_COUNTDOWN: u8 = u8::MAX;

/// A request-status write: `Granted` or `Expired`, made after the Lock write succeeded (with
/// `fence_expiry`, `Expired` is written before it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Mirror {
    inc: u8,
    /// resourceVersion of the request when the controller read it.
    rv: u8,
    phase: Phase,
}

/// A write planned from a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Plan {
    /// resourceVersion of the Lock in the snapshot.
    lock_rv: u8,
    /// The snapshot's `fencingToken` is still the store's (no grant since).
    fencing_current: bool,
    /// New `Lock.status.holders`, if they change.
    holders: Option<Holders>,
    /// With `fence_expiry`: the `Expired` marks are still to be written, before the Lock.
    fence_pending: bool,
    /// `BlindPatch` only: the entries of `holders` the plan changes (what a patch sends).
    touched: [bool; CLIENTS],
    /// Requests this plan grants (each takes the next token).
    grants: [bool; CLIENTS],
    /// Countdowns that start with these grants (the grant counts as an observation).
    observations: [Option<Observation>; CLIENTS],
    mirrors: [Option<Mirror>; CLIENTS],
}

/// Where a controller is in its reconcile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
enum Step {
    #[default]
    Idle,
    /// Read and planned; next: CAS `Lock.status` (with `fence_expiry`, first the fences).
    Planned(Plan),
    /// `Lock.status` written; next: mirror into the requests.
    Mirroring([Option<Mirror>; CLIENTS]),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
struct Controller {
    observations: [Option<Observation>; CLIENTS],
    step: Step,
}

/// A client's belief about its current request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
enum Belief {
    /// No request.
    #[default]
    Idle,
    /// Request created, not seen granted.
    Waiting,
    /// Seen granted; acts as holder while its deadline has not passed.
    Holding,
    /// Lost for good; deletes the request before asking again.
    Lost,
    /// Liveness scenario only: the client process is gone; its request stays.
    Dead,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
struct Client {
    /// The current (or last) request.
    inc: u8,
    belief: Belief,
    /// Ticks until the local deadline (the clock reading before the last answered create or
    /// renewal, plus lease minus margin); 0: passed.
    left: u8,
    /// A renewal on the wire: ticks since the client read its clock to send it.
    in_flight: Option<u8>,
    /// Only with budgets.
    requests_left: u8,
    renewals_left: u8,
}

/// Sticky facts about the past that a single state cannot show.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
struct History {
    /// A write lowered `status.fencingToken`.
    fencing_decreased: bool,
    /// A write added a holder whose token is not above the `fencingToken` it replaced.
    token_not_fresh: bool,
    /// Liveness scenario: the waiter (client 0) has been granted.
    waiter_granted: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct State {
    store: Store,
    controllers: [Controller; CONTROLLERS],
    clients: [Client; CLIENTS],
    /// Only with budgets.
    crashes_left: u8,
    history: History,
}

/// The checker fingerprints every state it generates: hashing the state as one byte string
/// is several times faster than the derived field-by-field hash in a debug build.
impl std::hash::Hash for State {
    fn hash<H: std::hash::Hasher>(&self, hasher: &mut H) {
        let mut p = Packer::default();
        self.pack(&mut p);
        hasher.write(&p.bytes[..p.len]);
    }
}

/// Writes a state into bytes, one-to-one.
struct Packer {
    bytes: [u8; 192],
    len: usize,
}

impl Default for Packer {
    fn default() -> Self {
        Packer { bytes: [0; 192], len: 0 }
    }
}

impl Packer {
    fn put(&mut self, b: u8) {
        self.bytes[self.len] = b;
        self.len += 1;
    }
}

trait Pack {
    fn pack(&self, p: &mut Packer);
}

impl Pack for u8 {
    fn pack(&self, p: &mut Packer) {
        p.put(*self);
    }
}

impl Pack for bool {
    fn pack(&self, p: &mut Packer) {
        p.put(u8::from(*self));
    }
}

impl<T: Pack> Pack for Option<T> {
    fn pack(&self, p: &mut Packer) {
        match self {
            None => p.put(0),
            Some(t) => {
                p.put(1);
                t.pack(p);
            }
        }
    }
}

impl<T: Pack, const N: usize> Pack for [T; N] {
    fn pack(&self, p: &mut Packer) {
        for t in self {
            t.pack(p);
        }
    }
}

impl Pack for Phase {
    fn pack(&self, p: &mut Packer) {
        p.put(*self as u8);
    }
}

impl Pack for Belief {
    fn pack(&self, p: &mut Packer) {
        p.put(*self as u8);
    }
}

impl Pack for Request {
    fn pack(&self, p: &mut Packer) {
        [self.inc, self.rv, self.generation, self.created, self.renew_age].pack(p);
        self.phase.pack(p);
    }
}

impl Pack for Holder {
    fn pack(&self, p: &mut Packer) {
        self.inc.pack(p);
    }
}

impl Pack for Observation {
    fn pack(&self, p: &mut Packer) {
        [self.inc, self.generation, self.age].pack(p);
    }
}

impl Pack for Mirror {
    fn pack(&self, p: &mut Packer) {
        [self.inc, self.rv].pack(p);
        self.phase.pack(p);
    }
}

impl Pack for Controller {
    fn pack(&self, p: &mut Packer) {
        self.observations.pack(p);
        match &self.step {
            Step::Idle => p.put(0),
            Step::Planned(plan) => {
                p.put(1);
                [plan.lock_rv, u8::from(plan.fencing_current), u8::from(plan.fence_pending)].pack(p);
                plan.touched.pack(p);
                plan.holders.pack(p);
                plan.grants.pack(p);
                plan.observations.pack(p);
                plan.mirrors.pack(p);
            }
            Step::Mirroring(ms) => {
                p.put(2);
                ms.pack(p);
            }
        }
    }
}

impl Pack for Client {
    fn pack(&self, p: &mut Packer) {
        [self.inc, self.left, self.requests_left, self.renewals_left].pack(p);
        self.belief.pack(p);
        self.in_flight.pack(p);
    }
}

impl Pack for State {
    fn pack(&self, p: &mut Packer) {
        self.store.lock_rv.pack(p);
        self.store.holders.pack(p);
        self.store.requests.pack(p);
        self.controllers.pack(p);
        self.clients.pack(p);
        self.crashes_left.pack(p);
        let h = &self.history;
        [h.fencing_decreased, h.token_not_fresh, h.waiter_granted].pack(p);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Action {
    /// The clock advances one tick, for everybody.
    Tick,
    /// Client reads its clock and creates a new LockRequest.
    Create(usize),
    /// Client reads its clock and sends a renewal (patches `spec.renewTime`).
    SendRenewal(usize),
    /// The renewal reaches the API server and the client gets the answer. (An answer that
    /// is lost only leaves the client's deadline where it was: not modelled.)
    ApplyRenewal(usize),
    /// Client reads the Lock (a watch event).
    ReadLock(usize),
    /// Client reads its own request (a watch event).
    ReadRequest(usize),
    /// Client stops acting and deletes its request.
    Release(usize),
    /// Liveness scenario only: the client dies for good, leaving its request behind.
    Die(usize),
    /// Controller reads the store, updates its observations, plans.
    Reconcile(usize),
    /// Controller (with `fence_expiry`) marks the requests it expires `Expired`, each with
    /// the resourceVersion it read; if one fails it drops the plan.
    WriteFences(usize),
    /// Controller writes the planned `Lock.status` with the resourceVersion it read.
    WriteLock(usize),
    /// Controller writes the planned request statuses, each with the resourceVersion it read.
    WriteMirrors(usize),
    /// Controller crashes and restarts with empty memory.
    Crash(usize),
}

// ---------------------------------------------------------------------------------------
// The protocol
// ---------------------------------------------------------------------------------------

/// Does client `c` act as holder? Only while it believes it holds and its deadline has not
/// passed.
fn acts(cfg: &Config, s: &State, c: usize) -> bool {
    let client = &s.clients[c];
    client.belief == Belief::Holding && (client.left > 0 || cfg.variant == Variant::IgnoreDeadline)
}

/// A client learns it is granted: it holds if its deadline has not passed, else it is lost
/// (a waiter whose deadline passed is already lost, unless a variant says otherwise).
fn on_granted(cfg: &Config, client: &mut Client) {
    client.belief = if client.left > 0 || !cfg.holder_deadline_final() { Belief::Holding } else { Belief::Lost };
}

/// A controller's reconcile on a snapshot: update its observations, then plan.
fn reconcile(
    cfg: &Config,
    snap: &Store,
    seen: &[Option<Observation>; CLIENTS],
) -> ([Option<Observation>; CLIENTS], Option<Plan>) {
    // Observe: a changed generation, or a holder not seen before (granted by the other
    // controller, or seen first after a restart), starts a new countdown.
    let mut obs = [None; CLIENTS];
    for c in 0..CLIENTS {
        let Some(h) = snap.holders[c] else { continue };
        let Some(r) = snap.request(c, h.inc) else {
            continue;
        };
        let fresh = Observation { inc: h.inc, generation: r.generation, age: 0 };
        obs[c] = Some(match seen[c] {
            Some(o) if o.inc == h.inc && o.generation == r.generation => o,
            Some(o) if o.inc == h.inc => fresh,
            _ if cfg.variant == Variant::CountdownNeedsRenewal => Observation { age: NO_COUNTDOWN, ..fresh },
            _ => fresh,
        });
    }

    let mut holders = snap.holders;
    let mut mirrors = [None; CLIENTS];
    let mut grants = [false; CLIENTS];
    let mut grant_obs = [None; CLIENTS];
    // Free the permits of holders whose request is gone (a clean release) or whose lease ran
    // out by this controller's own observations.
    for c in 0..CLIENTS {
        let Some(h) = holders[c] else { continue };
        let Some(r) = snap.request(c, h.inc) else {
            holders[c] = None;
            continue;
        };
        let ran_out = match (cfg.variant, obs[c]) {
            (Variant::TrustRenewTime, _) => r.renew_age >= cfg.lease,
            (_, Some(o)) => o.age != NO_COUNTDOWN && o.age >= cfg.lease,
            (_, None) => false,
        };
        if r.phase == Phase::Expired || ran_out {
            holders[c] = None;
            if r.phase != Phase::Expired {
                mirrors[c] = Some(Mirror { inc: r.inc, rv: r.rv, phase: Phase::Expired });
            }
        } else if r.phase == Phase::Pending {
            // The grant's mirror was lost (crash or conflict): write it again.
            mirrors[c] = Some(Mirror { inc: r.inc, rv: r.rv, phase: Phase::Granted });
        }
    }
    // A request marked Granted that no longer holds was expired and its mirror lost.
    for c in 0..CLIENTS {
        if let Some(r) = snap.requests[c]
            && r.phase == Phase::Granted
            && !lists(&snap.holders, c, r.inc)
        {
            mirrors[c] = Some(Mirror { inc: r.inc, rv: r.rv, phase: Phase::Expired });
        }
    }
    // Grant FIFO heads that fit; the first that does not fit blocks those behind it.
    let mut free = cfg.permits - granted(cfg, &holders);
    let mut queued = [false; CLIENTS];
    for c in 0..CLIENTS {
        if let Some(r) = snap.requests[c] {
            queued[c] = r.phase == Phase::Pending && !lists(&snap.holders, c, r.inc);
        }
    }
    loop {
        let mut head = None;
        for c in 0..CLIENTS {
            if queued[c] {
                let created = snap.requests[c].expect("queued").created;
                if head.is_none_or(|(_, h)| created < h) {
                    head = Some((c, created));
                }
            }
        }
        let Some((c, _)) = head else { break };
        if cfg.wants[c] > free {
            break;
        }
        let r = snap.requests[c].expect("queued");
        queued[c] = false;
        free -= cfg.wants[c];
        holders[c] = Some(Holder { inc: r.inc });
        grants[c] = true;
        mirrors[c] = Some(Mirror { inc: r.inc, rv: r.rv, phase: Phase::Granted });
        let age = if cfg.variant == Variant::CountdownNeedsRenewal { NO_COUNTDOWN } else { 0 };
        grant_obs[c] = Some(Observation { inc: r.inc, generation: r.generation, age });
    }

    let changed = holders != snap.holders;
    let expiring = mirrors.iter().flatten().any(|m| m.phase == Phase::Expired);
    let mut touched = [false; CLIENTS];
    if cfg.variant == Variant::BlindPatch {
        for c in 0..CLIENTS {
            touched[c] = holders[c] != snap.holders[c];
        }
    }
    let plan = (changed || mirrors != [None; CLIENTS]).then_some(Plan {
        lock_rv: snap.lock_rv,
        fencing_current: true,
        holders: changed.then_some(holders),
        fence_pending: cfg.fence_expiry && expiring,
        touched,
        grants,
        observations: grant_obs,
        mirrors,
    });
    (obs, plan)
}

/// What a successful Lock write does to the fencing token, and to the liveness flag.
fn record_lock_write(cfg: &Config, history: &mut History, old: &Holders, new: &Holders, plan: &Plan) {
    let grants = plan.grants.iter().any(|&g| g);
    if !plan.fencing_current {
        // The snapshot's fencingToken is below the store's: granting reissues tokens at or
        // below it, and writing no grant puts it back down.
        if grants {
            history.token_not_fresh = true;
        } else {
            history.fencing_decreased = true;
        }
    }
    for c in 0..CLIENTS {
        if new[c].is_some() && new[c] != old[c] && !plan.grants[c] {
            // A holder that is back without a new grant carries an old token.
            history.token_not_fresh = true;
        }
    }
    if cfg.liveness && plan.grants[0] {
        history.waiter_granted = true;
    }
}

/// One tick for everybody's timers.
fn tick(cfg: &Config, s: &mut State) {
    let wire_cap = if cfg.variant == Variant::TrustRenewTime { cfg.lease } else { cfg.hold_ticks() };
    for c in 0..CLIENTS {
        let client = &mut s.clients[c];
        client.left = client.left.saturating_sub(1);
        if let Some(age) = client.in_flight {
            client.in_flight = Some((age + 1).min(wire_cap));
        }
    }
    for k in 0..CONTROLLERS {
        let ctrl = &mut s.controllers[k];
        for c in 0..CLIENTS {
            older(cfg, &mut ctrl.observations[c]);
            if let Step::Planned(p) = &mut ctrl.step {
                older(cfg, &mut p.observations[c]);
            }
        }
    }
    if cfg.variant == Variant::TrustRenewTime {
        for c in 0..CLIENTS {
            if let Some(r) = &mut s.store.requests[c] {
                r.renew_age = (r.renew_age + 1).min(cfg.lease);
            }
        }
    }
    if cfg.liveness {
        // The waiter renews at every tick, at once.
        let inc = s.clients[0].inc;
        if let Some(r) = &mut s.store.requests[0] {
            r.rv = FRESH;
            r.generation = FRESH;
            if r.phase != Phase::Expired && r.inc == inc {
                s.clients[0].left = cfg.hold_ticks();
            }
        }
    }
}

fn older(cfg: &Config, o: &mut Option<Observation>) {
    if let Some(o) = o
        && o.age != NO_COUNTDOWN
    {
        o.age = (o.age + 1).min(cfg.lease);
    }
}

/// A value no canonical state holds: what a write stamps on what it changes.
const FRESH: u8 = 2;

/// Bring the state into a canonical form, so that states that differ only in how many writes,
/// renewals, requests or grants led to them, or in details that can no longer matter, are
/// merged. This is what makes the state space finite with unbounded time, renewals,
/// requests and crashes, and small enough to check in seconds.
///
/// - resourceVersions, generations and request incarnations are only compared for equality
///   with the object's current one, and a write always takes a new one: the current one
///   becomes 1, every other one 0.
/// - Observations of a request that is gone or has been renewed since, mirrors whose CAS
///   must fail, plans whose Lock CAS must fail: they behave exactly like none.
/// - A lost or idle client's deadline and the age of its renewal on the wire are no longer
///   looked at.
/// - Creation order is renumbered densely.
fn canonicalize(cfg: &Config, s: &mut State) {
    // A pending fence whose CAS must fail (its request changed) dooms the plan: the other
    // fences are still written, then the controller drops the rest.
    for k in 0..CONTROLLERS {
        if let Step::Planned(p) = &mut s.controllers[k].step
            && p.fence_pending
        {
            let mut doomed = false;
            for c in 0..CLIENTS {
                if let Some(m) = p.mirrors[c]
                    && m.phase == Phase::Expired
                    && s.store.request(c, m.inc).is_none_or(|r| r.rv != m.rv)
                {
                    doomed = true;
                }
            }
            if doomed {
                p.holders = None;
                p.grants = [false; CLIENTS];
                p.observations = [None; CLIENTS];
                for m in &mut p.mirrors {
                    if m.is_some_and(|m| m.phase != Phase::Expired) {
                        *m = None;
                    }
                }
            }
        }
    }
    let lock_rv = s.store.lock_rv;
    s.store.lock_rv = 1;
    for c in 0..CLIENTS {
        let inc = s.clients[c].inc;
        let req = s.store.requests[c];
        debug_assert!(req.is_none_or(|r| r.inc == inc));
        let (rv, generation) = match req {
            Some(r) => (Some(r.rv), Some(r.generation)),
            None => (None, None),
        };
        for k in 0..CONTROLLERS {
            let ctrl = &mut s.controllers[k];
            ctrl.observations[c] = canonical_observation(cfg, ctrl.observations[c], inc, generation);
            match &mut ctrl.step {
                Step::Idle => {}
                Step::Planned(p) => {
                    p.observations[c] = canonical_observation(cfg, p.observations[c], inc, generation);
                    p.mirrors[c] = canonical_mirror(p.mirrors[c], inc, rv);
                    if let Some(hs) = &mut p.holders
                        && let Some(h) = &mut hs[c]
                    {
                        h.inc = u8::from(h.inc == inc);
                    }
                }
                Step::Mirroring(ms) => ms[c] = canonical_mirror(ms[c], inc, rv),
            }
        }
        if let Some(h) = &mut s.store.holders[c] {
            h.inc = u8::from(h.inc == inc);
        }
        if let Some(r) = &mut s.store.requests[c] {
            r.inc = 1;
            r.rv = 1;
            r.generation = 1;
        }
        let client = &mut s.clients[c];
        client.inc = 1;
        if matches!(client.belief, Belief::Idle | Belief::Lost | Belief::Dead) {
            client.left = 0;
            if client.in_flight.is_some() && cfg.variant != Variant::TrustRenewTime {
                client.in_flight = Some(0);
            }
        }
    }
    for k in 0..CONTROLLERS {
        let step = &mut s.controllers[k].step;
        match step {
            Step::Idle => {}
            Step::Planned(p) => {
                p.lock_rv = u8::from(p.lock_rv == lock_rv);
                // (Pending fences are still written: not doomed.)
                let doomed = p.holders.is_some()
                    && p.lock_rv == 0
                    && !matches!(cfg.variant, Variant::BlindWrite | Variant::BlindPatch)
                    && !p.fence_pending;
                let empty = p.holders.is_none() && p.mirrors == [None; CLIENTS];
                if doomed || empty {
                    *step = Step::Idle;
                }
            }
            Step::Mirroring(ms) => {
                if *ms == [None; CLIENTS] {
                    *step = Step::Idle;
                }
            }
        }
    }
    // Creation order of the requests present, renumbered 0, 1, 2.
    let mut order = [u8::MAX; CLIENTS];
    for c in 0..CLIENTS {
        if let Some(r) = s.store.requests[c] {
            order[c] = r.created;
        }
    }
    for c in 0..CLIENTS {
        if let Some(r) = &mut s.store.requests[c] {
            let mut rank = 0;
            for d in 0..CLIENTS {
                if order[d] < order[c] {
                    rank += 1;
                }
            }
            r.created = rank;
        }
    }
}

/// An observation of a request that is gone or has been renewed since acts exactly like no
/// observation (the next read starts a fresh countdown); in the variant that needs a renewal
/// to start one, only its age stops mattering.
fn canonical_observation(cfg: &Config, o: Option<Observation>, inc: u8, generation: Option<u8>) -> Option<Observation> {
    let o = o?;
    let g = generation?;
    if o.inc != inc {
        None
    } else if o.generation == g {
        Some(Observation { inc: 1, generation: 1, age: o.age })
    } else if cfg.variant == Variant::CountdownNeedsRenewal {
        Some(Observation { inc: 1, generation: 0, age: 0 })
    } else {
        None
    }
}

/// A mirror whose CAS must fail (the request changed or is gone) is as good as none.
fn canonical_mirror(m: Option<Mirror>, inc: u8, rv: Option<u8>) -> Option<Mirror> {
    let m = m?;
    (m.inc == inc && Some(m.rv) == rv).then_some(Mirror { inc: 1, rv: 1, phase: m.phase })
}

/// The state with clients renamed (new client `i` is old client `perm[i]`) and, if `swap`,
/// the two controllers exchanged.
fn permute(s: &State, perm: [usize; CLIENTS], swap: bool) -> State {
    let mut t = *s;
    if swap {
        t.controllers.swap(0, 1);
    }
    if perm == [0, 1, 2] {
        return t;
    }
    let u = t;
    for i in 0..CLIENTS {
        let j = perm[i];
        t.clients[i] = u.clients[j];
        t.store.requests[i] = u.store.requests[j];
        t.store.holders[i] = u.store.holders[j];
        for k in 0..CONTROLLERS {
            let (from, to) = (&u.controllers[k], &mut t.controllers[k]);
            to.observations[i] = from.observations[j];
            match (&from.step, &mut to.step) {
                (Step::Planned(a), Step::Planned(b)) => {
                    b.mirrors[i] = a.mirrors[j];
                    b.grants[i] = a.grants[j];
                    b.touched[i] = a.touched[j];
                    b.observations[i] = a.observations[j];
                    if let (Some(ha), Some(hb)) = (&a.holders, &mut b.holders) {
                        hb[i] = ha[j];
                    }
                }
                (Step::Mirroring(a), Step::Mirroring(b)) => b[i] = a[j],
                _ => {}
            }
        }
    }
    t
}

/// Symmetry reduction: the representative of the states that differ only by a renaming of
/// interchangeable clients (same permits asked, same clock, not the liveness waiter) and of
/// the two controllers. Clients are sorted by what the state says about each, then the
/// controllers are put in order. (Equal keys that still differ in how the controllers see
/// them may leave two representatives for one class: that costs states, not soundness.)
fn representative(cfg: &Config, s: &State) -> State {
    type ControllerKey = (u8, Option<Observation>, Option<Mirror>, bool, Option<Observation>, Option<Holder>);
    let controller_key = |k: &Controller, c: usize| -> ControllerKey {
        match &k.step {
            Step::Idle => (0, k.observations[c], None, false, None, None),
            Step::Planned(p) => (
                1 + u8::from(p.lock_rv == 1) + 2 * u8::from(p.holders.is_some()) + 4 * u8::from(p.fence_pending),
                k.observations[c],
                p.mirrors[c],
                p.grants[c],
                p.observations[c],
                p.holders.and_then(|hs| hs[c]),
            ),
            Step::Mirroring(ms) => (9, k.observations[c], ms[c], false, None, None),
        }
    };
    let key = |c: usize| {
        let (a, b) = (controller_key(&s.controllers[0], c), controller_key(&s.controllers[1], c));
        let ks = if a <= b { [a, b] } else { [b, a] };
        (s.clients[c], s.store.requests[c], s.store.holders[c], ks)
    };
    let keys = [key(0), key(1), key(2)];
    let class = |c: usize| (cfg.wants[c], cfg.clock_lag[c], cfg.liveness && c == 0);
    let mut perm = [0, 1, 2];
    for c in 0..CLIENTS {
        for d in c + 1..CLIENTS {
            if class(c) == class(d) && keys[perm[d]] < keys[perm[c]] {
                perm.swap(c, d);
            }
        }
    }
    let mut t = permute(s, perm, false);
    if t.controllers[1] < t.controllers[0] {
        t.controllers.swap(0, 1);
    }
    t
}

/// Every controller is idle and a fresh reconcile would neither observe nor plan anything.
fn controllers_caught_up(cfg: &Config, s: &State) -> bool {
    (0..CONTROLLERS).all(|k| {
        let ctrl = &s.controllers[k];
        let (obs, plan) = reconcile(cfg, &s.store, &ctrl.observations);
        ctrl.step == Step::Idle && plan.is_none() && obs == ctrl.observations
    })
}

struct LockModel {
    cfg: Config,
}

impl Model for LockModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let cfg = &self.cfg;
        let mut clients = [Client::default(); CLIENTS];
        for (c, client) in clients.iter_mut().enumerate() {
            client.inc = 1;
            client.requests_left = match cfg.budget.requests {
                _ if cfg.liveness && c == 0 => 1,
                Some(n) => n,
                None => 0,
            };
        }
        vec![State {
            store: Store { lock_rv: 1, ..Store::default() },
            controllers: [Controller::default(); CONTROLLERS],
            clients,
            crashes_left: cfg.budget.crashes.unwrap_or(0),
            history: History::default(),
        }]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        let cfg = &self.cfg;
        let tick_allowed = !cfg.liveness
            || (s.clients[0].requests_left == 0
                && s.clients.iter().all(|c| c.in_flight.is_none())
                && controllers_caught_up(cfg, s));
        if tick_allowed {
            actions.push(Action::Tick);
        }
        for c in 0..CLIENTS {
            let client = &s.clients[c];
            let waiter = cfg.liveness && c == 0;
            match client.belief {
                Belief::Idle => {
                    if (cfg.budget.requests.is_none() && !waiter) || client.requests_left > 0 {
                        actions.push(Action::Create(c));
                    }
                }
                Belief::Waiting | Belief::Holding => {
                    let may_renew = cfg.budget.renewals.is_none() || client.renewals_left > 0;
                    if client.in_flight.is_none() && may_renew && !waiter {
                        actions.push(Action::SendRenewal(c));
                    }
                    actions.push(Action::ReadLock(c));
                    actions.push(Action::ReadRequest(c));
                    if !waiter {
                        actions.push(Action::Release(c));
                    }
                }
                Belief::Lost => {
                    if !waiter {
                        actions.push(Action::Release(c));
                    }
                }
                Belief::Dead => {}
            }
            if cfg.liveness && !waiter && !matches!(client.belief, Belief::Idle | Belief::Dead) {
                actions.push(Action::Die(c));
            }
            if client.in_flight.is_some() {
                actions.push(Action::ApplyRenewal(c));
            }
        }
        for k in 0..CONTROLLERS {
            actions.push(match s.controllers[k].step {
                Step::Idle => Action::Reconcile(k),
                Step::Planned(p) if p.fence_pending => Action::WriteFences(k),
                Step::Planned(_) => Action::WriteLock(k),
                Step::Mirroring(_) => Action::WriteMirrors(k),
            });
            if cfg.budget.crashes.is_none() || s.crashes_left > 0 {
                actions.push(Action::Crash(k));
            }
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let cfg = &self.cfg;
        let mut s = *last;
        match action {
            Action::Tick => tick(cfg, &mut s),
            Action::Create(c) => {
                let client = &mut s.clients[c];
                client.inc = FRESH;
                client.belief = Belief::Waiting;
                client.left = cfg.hold_ticks();
                client.in_flight = None;
                client.requests_left = client.requests_left.saturating_sub(1);
                client.renewals_left = cfg.budget.renewals.unwrap_or(0);
                s.store.requests[c] = Some(Request {
                    inc: FRESH,
                    rv: FRESH,
                    generation: FRESH,
                    created: u8::MAX,
                    renew_age: renew_age(cfg, 0, c),
                    phase: Phase::Pending,
                });
            }
            Action::SendRenewal(c) => {
                let client = &mut s.clients[c];
                client.in_flight = Some(0);
                client.renewals_left = client.renewals_left.saturating_sub(1);
            }
            Action::ApplyRenewal(c) => {
                let client = &mut s.clients[c];
                let age = client.in_flight.take().expect("renewal in flight");
                let answer = match s.store.request(c, client.inc) {
                    Some(mut r) => {
                        r.rv = FRESH;
                        r.generation = FRESH;
                        r.renew_age = renew_age(cfg, age, c);
                        s.store.requests[c] = Some(r);
                        Some(r.phase)
                    }
                    None => None,
                };
                match (client.belief, answer) {
                    (Belief::Idle | Belief::Lost | Belief::Dead, _) => {}
                    // 404, or the request says Expired: lost.
                    (_, None | Some(Phase::Expired)) => client.belief = Belief::Lost,
                    // The deadline now counts from the clock reading before the send.
                    (_, Some(_)) => client.left = cfg.hold_ticks().saturating_sub(age),
                }
            }
            Action::ReadLock(c) => {
                let client = &mut s.clients[c];
                let listed = lists(&s.store.holders, c, client.inc);
                match client.belief {
                    Belief::Waiting if listed => on_granted(cfg, client),
                    // A Lock status newer than one that listed us no longer does.
                    Belief::Holding if !listed => client.belief = Belief::Lost,
                    _ => {}
                }
            }
            Action::ReadRequest(c) => {
                let client = &mut s.clients[c];
                match s.store.request(c, client.inc).map(|r| r.phase) {
                    None | Some(Phase::Expired) => client.belief = Belief::Lost,
                    Some(Phase::Granted) if client.belief == Belief::Waiting => on_granted(cfg, client),
                    _ => {}
                }
            }
            Action::Release(c) => {
                let client = &mut s.clients[c];
                client.belief = Belief::Idle;
                client.in_flight = None;
                s.store.requests[c] = None;
            }
            Action::Die(c) => {
                let client = &mut s.clients[c];
                client.belief = Belief::Dead;
                client.left = 0;
            }
            Action::Reconcile(k) => {
                let ctrl = &mut s.controllers[k];
                let (obs, plan) = reconcile(cfg, &s.store, &ctrl.observations);
                ctrl.observations = obs;
                if let Some(plan) = plan {
                    ctrl.step = Step::Planned(plan);
                }
            }
            Action::WriteLock(k) => {
                let Step::Planned(plan) = s.controllers[k].step else { unreachable!() };
                s.controllers[k].step = Step::Idle;
                match plan.holders {
                    Some(mut new) => {
                        let blind = matches!(cfg.variant, Variant::BlindWrite | Variant::BlindPatch);
                        if cfg.variant == Variant::BlindPatch {
                            for c in 0..CLIENTS {
                                if !plan.touched[c] {
                                    new[c] = s.store.holders[c];
                                }
                            }
                        }
                        if s.store.lock_rv == plan.lock_rv || blind {
                            record_lock_write(cfg, &mut s.history, &s.store.holders, &new, &plan);
                            s.store.lock_rv = FRESH;
                            s.store.holders = new;
                            let ctrl = &mut s.controllers[k];
                            for c in 0..CLIENTS {
                                if plan.observations[c].is_some() {
                                    ctrl.observations[c] = plan.observations[c];
                                }
                            }
                            ctrl.step = Step::Mirroring(plan.mirrors);
                            if plan.grants.iter().any(|&g| g) {
                                // The fencingToken went up: every other snapshot is behind.
                                for other in &mut s.controllers {
                                    if let Step::Planned(p) = &mut other.step {
                                        p.fencing_current = false;
                                    }
                                }
                            }
                        }
                        // On a conflict the plan is dropped; the next reconcile re-reads.
                    }
                    None => s.controllers[k].step = Step::Mirroring(plan.mirrors),
                }
            }
            Action::WriteFences(k) => {
                let Step::Planned(mut plan) = s.controllers[k].step else { unreachable!() };
                let mut all_written = true;
                for c in 0..CLIENTS {
                    let Some(m) = plan.mirrors[c] else { continue };
                    if m.phase != Phase::Expired {
                        continue;
                    }
                    match s.store.request(c, m.inc) {
                        Some(mut r) if r.rv == m.rv => {
                            r.rv = FRESH;
                            r.phase = Phase::Expired;
                            s.store.requests[c] = Some(r);
                            plan.mirrors[c] = None;
                        }
                        _ => all_written = false,
                    }
                }
                plan.fence_pending = false;
                s.controllers[k].step = if all_written { Step::Planned(plan) } else { Step::Idle };
            }
            Action::WriteMirrors(k) => {
                let Step::Mirroring(mirrors) = s.controllers[k].step else { unreachable!() };
                s.controllers[k].step = Step::Idle;
                for c in 0..CLIENTS {
                    let Some(m) = mirrors[c] else { continue };
                    let Some(mut r) = s.store.request(c, m.inc) else {
                        continue;
                    };
                    if r.rv == m.rv {
                        r.rv = FRESH;
                        r.phase = m.phase;
                        s.store.requests[c] = Some(r);
                    }
                    // On a conflict the next reconcile plans the mirror again.
                }
            }
            Action::Crash(k) => {
                if s.controllers[k] == Controller::default() {
                    return None;
                }
                s.controllers[k] = Controller::default();
                s.crashes_left = s.crashes_left.saturating_sub(1);
            }
        }
        // Past its deadline a client is lost for good.
        for client in &mut s.clients {
            let bound = match client.belief {
                Belief::Holding => cfg.holder_deadline_final(),
                Belief::Waiting => cfg.waiter_deadline_final(),
                _ => false,
            };
            if bound && client.left == 0 {
                client.belief = Belief::Lost;
            }
        }
        canonicalize(cfg, &mut s);
        if cfg.symmetric {
            s = representative(cfg, &s);
        }
        (s != *last).then_some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        let mut props = vec![
            Property::<Self>::always("store: granted permits <= permits", |m, s| {
                granted(&m.cfg, &s.store.holders) <= m.cfg.permits
            }),
            Property::<Self>::always(CLIENT_SAFETY, |m, s| acting_permits(&m.cfg, s) <= m.cfg.permits),
            Property::<Self>::always(ACTS_ONLY_WHILE_LISTED, |m, s| {
                (0..CLIENTS).all(|c| !acts(&m.cfg, s, c) || lists(&s.store.holders, c, s.clients[c].inc))
            }),
            Property::<Self>::always("fencing token never decreases", |_, s| !s.history.fencing_decreased),
            Property::<Self>::always("each token issued once, above all earlier ones", |_, s| {
                !s.history.token_not_fresh
            }),
        ];
        if self.cfg.liveness {
            props.push(Property::<Self>::eventually("the waiter is granted", |_, s| s.history.waiter_granted));
        }
        if !self.cfg.examples {
            return props;
        }
        // Non-vacuity: the situations the safety argument is about do occur.
        props.extend([
            Property::<Self>::sometimes("a client acts as holder", |m, s| acting_permits(&m.cfg, s) > 0),
            Property::<Self>::sometimes("a request is expired", |_, s| {
                s.store.requests.iter().flatten().any(|r| r.phase == Phase::Expired)
            }),
            Property::<Self>::sometimes("a request is expired with its renewal on the wire", |_, s| {
                (0..CLIENTS).any(|c| {
                    s.clients[c].in_flight.is_some() && s.store.requests[c].is_some_and(|r| r.phase == Phase::Expired)
                })
            }),
            Property::<Self>::sometimes("both controllers have a Lock write planned", |_, s| {
                s.controllers.iter().all(|k| matches!(k.step, Step::Planned(p) if p.holders.is_some()))
            }),
            Property::<Self>::sometimes("a renewal lands after its client is lost", |_, s| {
                s.clients.iter().any(|c| c.belief == Belief::Lost && c.in_flight.is_some())
            }),
        ]);
        if self.cfg.permits > 1 {
            props.push(Property::<Self>::sometimes("two clients act as holder at once", |m, s| {
                (0..CLIENTS).filter(|&c| acts(&m.cfg, s, c)).count() >= 2
            }));
        }
        props
    }
}

fn acting_permits(cfg: &Config, s: &State) -> u8 {
    let mut sum = 0;
    for c in 0..CLIENTS {
        if acts(cfg, s, c) {
            sum += cfg.wants[c];
        }
    }
    sum
}

/// How old a renewTime sent `age` ticks ago looks on the controller's clock.
fn renew_age(cfg: &Config, age: u8, c: usize) -> u8 {
    if cfg.variant == Variant::TrustRenewTime { (age + cfg.clock_lag[c]).min(cfg.lease) } else { 0 }
}

// ---------------------------------------------------------------------------------------
// Running the checker
// ---------------------------------------------------------------------------------------

/// What to look for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Search {
    /// Every reachable state (the safety and liveness checks).
    Everything,
    /// A shortest counterexample to this property (the broken variants).
    Counterexample(&'static str),
    /// An example of each `sometimes` property.
    Examples,
}

/// Outcome of one check.
struct Outcome {
    states: usize,
    failed: Vec<(&'static str, String)>,
    missing_examples: Vec<&'static str>,
}

/// Explore the model breadth-first. With `stop_at`, stop once that property has
/// a discovery (breadth-first: the shortest counterexample); otherwise visit every reachable
/// state, and fail if there are more than `cap` (a model that grows must not silently stop
/// short of covering its whole state space).
fn explore(name: &str, cfg: Config, cap: usize, search: Search) -> Outcome {
    let model = LockModel { cfg: cfg.clone() };
    let start = Instant::now();
    let finish = match search {
        Search::Everything => HasDiscoveries::All,
        Search::Counterexample(property) => HasDiscoveries::AnyOf([property].into()),
        Search::Examples => HasDiscoveries::AllOf(
            model.properties().iter().filter(|p| p.expectation == Expectation::Sometimes).map(|p| p.name).collect(),
        ),
    };
    // A search for a counterexample stays on one thread so that it finds a shortest one.
    let threads = if search == Search::Everything { 2 } else { 1 };
    let checker = model.checker().threads(threads).finish_when(finish).target_state_count(cap).spawn_bfs().join();
    let seconds = start.elapsed().as_secs_f64();
    let states = checker.unique_state_count();
    let generated = checker.state_count();
    let discoveries = checker.discoveries();
    let mut failed = Vec::new();
    let mut missing_examples = Vec::new();
    for p in checker.model().properties() {
        match (p.expectation.discovery_is_failure(), discoveries.get(p.name)) {
            (true, Some(path)) => failed.push((p.name, timeline(&cfg, path))),
            (false, None) => missing_examples.push(p.name),
            _ => {}
        }
    }
    let violated: Vec<&str> = failed.iter().map(|f| f.0).collect();
    println!(
        "{name}: {states} distinct states ({generated} generated), depth {}, {seconds:.1}s, \
         violated: {violated:?}",
        checker.max_depth(),
    );
    if search == Search::Everything {
        assert!(
            generated < cap,
            "{name}: generated {generated} states, cap {cap}: the check did not cover the \
             whole state space"
        );
    }
    Outcome { states, failed, missing_examples }
}

/// A readable counterexample: each step and the parts of the state that matter.
fn timeline(cfg: &Config, path: &Path<State, Action>) -> String {
    let mut out = String::new();
    for (s, action) in unreduced(cfg, path) {
        let holders: Vec<String> =
            (0..CLIENTS).filter(|&c| s.store.holders[c].is_some()).map(|c| format!("c{c}")).collect();
        let clients: Vec<String> = (0..CLIENTS)
            .map(|c| {
                let k = &s.clients[c];
                let wire = match k.in_flight {
                    Some(age) => format!(", renewal on the wire for {age}t"),
                    None => String::new(),
                };
                let act = if acts(cfg, &s, c) { " ACTS" } else { "" };
                format!("c{c} {:?} {}t left{wire}{act}", k.belief, k.left)
            })
            .collect();
        let _ = writeln!(out, "    Lock holders [{}] | {}", holders.join(", "), clients.join("; "));
        if let Some(a) = action {
            let _ = writeln!(out, "  {a:?}");
        }
    }
    out
}

/// The path with the symmetry reduction undone: states of a reduced path are
/// representatives, so client and controller names may swap from one step to the next.
/// Replay it on the plain model, at each step taking the action whose result has the next
/// state as its representative.
fn unreduced(cfg: &Config, path: &Path<State, Action>) -> Vec<(State, Option<Action>)> {
    let steps = path.clone().into_vec();
    if !cfg.symmetric {
        return steps;
    }
    let plain = LockModel { cfg: cfg.clone().plain() };
    let mut now = plain.init_states()[0];
    let mut out = Vec::new();
    for (next, _) in steps.iter().skip(1) {
        let mut actions = Vec::new();
        plain.actions(&now, &mut actions);
        let (action, state) = actions
            .into_iter()
            .find_map(|a| {
                let n = plain.next_state(&now, a)?;
                (representative(cfg, &n) == *next).then_some((a, n))
            })
            .expect("a reduced step is a renamed plain step");
        out.push((now, Some(action)));
        now = state;
    }
    out.push((now, None));
    out
}

/// Check every reachable state; then, for a safety model, that the situations the argument is
/// about are among them (else the model would be vacuous).
fn assert_holds(name: &str, cfg: Config, cap: usize) {
    let outcome = explore(name, cfg.clone(), cap, Search::Everything);
    if let Some((prop, trace)) = outcome.failed.first() {
        panic!("{name}: \"{prop}\" violated:\n{trace}");
    }
    if cfg.liveness {
        return;
    }
    let examples = explore(name, Config { examples: true, ..cfg }, cap, Search::Examples);
    assert!(
        examples.missing_examples.is_empty(),
        "{name}: no run reached {:?}: the model is vacuous there",
        examples.missing_examples
    );
}

fn assert_violates(name: &str, cfg: Config, cap: usize, property: &'static str) {
    let outcome = explore(name, cfg, cap, Search::Counterexample(property));
    let Some((_, trace)) = outcome.failed.iter().find(|f| f.0 == property) else {
        panic!(
            "{name}: expected a counterexample to \"{property}\"; found {:?} in {} states",
            outcome.failed.iter().map(|f| f.0).collect::<Vec<_>>(),
            outcome.states
        );
    };
    println!("{name}: counterexample to \"{property}\":\n{trace}");
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

const CAP: usize = 20_000_000;
/// Counterexamples are short: a variant that takes longer to break is not breaking.
const CAP_BROKEN: usize = 1_000_000;
const CLIENT_SAFETY: &str = "clients: permits of clients acting as holder <= permits";
const ACTS_ONLY_WHILE_LISTED: &str = "a client acts as holder only while the Lock lists it";

/// Mutual exclusion on the store and at the clients, and the token properties, for a mutex,
/// with unbounded time, requests, renewals and controller crashes.
#[test]
fn mutex_is_safe() {
    assert_holds("mutex", Config::mutex(), CAP);
}

/// The same for a semaphore of 2 with a writer (2 permits) and two readers: every client
/// asks once and the controllers do not crash, or the check would take minutes.
#[test]
fn semaphore_is_safe() {
    let cfg = Config { budget: Budget { requests: Some(1), renewals: None, crashes: Some(0) }, ..Config::semaphore() };
    assert_holds("semaphore", cfg, CAP);
}

/// A waiter behind two holders of a mutex is granted once they release or die.
#[test]
fn waiter_is_eventually_granted() {
    assert_holds("mutex waiter", Config::mutex().waiter(), CAP);
}

/// A writer waiting behind readers of a semaphore is granted: readers arriving later queue
/// behind it and do not starve it.
#[test]
fn writer_is_eventually_granted() {
    let cfg = Config { wants: [2, 1, 1], ..Config::semaphore() }.waiter();
    assert_holds("semaphore writer waiter", cfg, CAP);
}

/// What the design says today is not enough: a waiter whose deadline passed keeps its
/// request; a renewal sent later, which the controller has not seen when it expires the
/// grant it made meanwhile, gives the waiter a fresh deadline, and it acts on the expired
/// grant next to its successor.
#[test]
fn design_as_written_lets_a_late_waiter_act_on_an_expired_grant() {
    let cfg = Config::mutex().small().with(Variant::WaiterDeadlineOpen);
    assert_violates("deadline open for waiters", cfg.clone(), CAP_BROKEN, ACTS_ONLY_WHILE_LISTED);
    assert_violates("deadline open for waiters", cfg, CAP_BROKEN, CLIENT_SAFETY);
}

/// With the deadline not final for holders either, a holder past its deadline whose renewal
/// is answered late acts again on a grant that has been expired. (Two holders acting at once
/// follow as in the test above; this checks the first step, which is cheaper to reach.)
#[test]
fn late_answer_that_revives_a_hold_breaks_exclusion() {
    let cfg = Config::mutex().small().with(Variant::LateAnswerRevives);
    assert_violates("late answer revives", cfg, CAP_BROKEN, ACTS_ONLY_WHILE_LISTED);
}

/// A paused holder that wakes up and acts on its last (stale) read of the Lock.
#[test]
fn ignoring_the_deadline_breaks_exclusion() {
    let cfg = Config::mutex().small().with(Variant::IgnoreDeadline);
    assert_violates("ignore deadline", cfg, CAP_BROKEN, CLIENT_SAFETY);
}

/// Two controllers that replace the status without CAS: the slower one overwrites the
/// other's grant with its own, both grantees act, and tokens are reissued. (The store alone
/// never shows more permits than allowed: each write is a whole, consistent status.)
#[test]
fn blind_writes_break_mutual_exclusion_and_tokens() {
    let cfg = Config::mutex().small().with(Variant::BlindWrite);
    assert_violates("blind write", cfg.clone(), CAP_BROKEN, CLIENT_SAFETY);
    assert_violates("blind write", cfg, CAP_BROKEN, "each token issued once, above all earlier ones");
}

/// Comparing a client's renewTime with the controller's clock expires a holder whose clock
/// lags while it still acts.
#[test]
fn trusting_renew_time_breaks_exclusion() {
    let cfg = Config { clock_lag: [2, 0, 0], ..Config::mutex() }.with(Variant::TrustRenewTime);
    assert_violates("trust renewTime", cfg, CAP_BROKEN, CLIENT_SAFETY);
}

/// A holder that dies right after its grant is never expired if only a renewal starts the
/// countdown: the waiter starves. (Shows the liveness property can fail.)
#[test]
fn countdown_that_needs_a_renewal_starves_the_waiter() {
    let cfg = Config::mutex().waiter().with(Variant::CountdownNeedsRenewal);
    assert_violates("countdown needs renewal", cfg, CAP_BROKEN, "the waiter is granted");
}

/// Fencing the expiry (mark the request `Expired` by CAS before dropping it from the Lock)
/// closes the same hole from the controller's side: with it, the client rules as the design
/// now reads them are safe. (Each client asks once here, to keep the check short.)
#[test]
fn fenced_expiry_is_safe_even_with_the_waiter_rule_as_written() {
    let cfg =
        Config { fence_expiry: true, budget: Budget { requests: Some(1), ..Budget::default() }, ..Config::mutex() }
            .with(Variant::WaiterDeadlineOpen);
    assert_holds("fenced expiry, waiter rule as written", cfg, CAP);
}

/// Controllers that patch their changes in without CAS: one grants from a stale read on top
/// of the other's grant, and the Lock itself lists more permits than it has. (Why the design
/// says "replace, not a blind patch".)
#[test]
fn blind_patches_break_mutual_exclusion_in_the_store() {
    let cfg = Config::mutex().small().with(Variant::BlindPatch);
    assert_violates("blind patch", cfg, CAP_BROKEN, "store: granted permits <= permits");
}

/// With perfect clocks the margin is not what keeps the protocol safe: the controller's
/// countdown starts no earlier than the client's (the margin is for clock-rate drift, which
/// the model does not have). Each client asks once and no controller crashes, for time.
#[test]
fn mutex_is_safe_without_margin() {
    let cfg = Config { margin: 0, ..Config::mutex().small() };
    assert_holds("mutex, no margin", cfg, CAP);
}

// ---------------------------------------------------------------------------------------
// Every end of a grant, and the one rule
// ---------------------------------------------------------------------------------------

/// A second model, of how a grant ends, with the model above's conclusions taken as given:
/// the controller's steps are atomic here (one controller; CAS, split brain, crashes and the
/// renewal that lands between a read and a write are the model above's subject), and an end
/// the controller writes is fenced: the request's status says the grant ended in the same
/// step, so a renewal answered later stops its client ("fenced expiry" above).
///
/// **What is modelled.** One Lock of one permit, [`ends::CLIENTS`] clients, each bound to a
/// pod of its own. A client requests (its deadline: `lease − margin` ticks from its clock
/// reading before the send), renews (the same, and the controller's countdown for it starts
/// again), reads its request (granted: it acts while its deadline has not passed; gone or
/// ended: it stops), marks its own release (`spec.released`, after it stopped acting) and
/// asks again later. Faults, at any moment and any number of times: another party deletes a
/// request; `kubelock break` of a grant; a request re-pointed at another Lock (its spec
/// changed); a holder's pod force-deleted (the object gone, the process may still run) or
/// deleted gracefully (terminating), and a terminating pod's containers reported terminated
/// by the kubelet (the process is gone: the only "confirmed stopped"); the Lock deleted (its
/// status with it) and created again under the same name. The controller frees permits on
/// the holder's own mark (then deletes the request), on a lease passed since the last
/// renewal it saw, on a pod confirmed stopped; every other end moves the grant to
/// `draining`, and a recreated Lock puts the requests an earlier Lock had granted there. It
/// grants in FIFO order what `holders + draining` leaves free.
///
/// **What it proves.** In every reachable state: the permits of clients acting as holder
/// never exceed the Lock's, and `holders + draining` never exceed them in the store. A
/// variant for each non-self end that frees the permits at once (as main did before the
/// one rule) fails the first property: the check finds the counterexample.
///
/// **What it does not prove.** Lock delay, tokens (the checker of the fault runs judges
/// them per Lock name on the real system), more than one permit, liveness, and the
/// interleavings inside a reconcile.
mod ends {
    use stateright::{Checker, Model, Property};

    pub const CLIENTS: usize = 2;
    const PERMITS: usize = 1;
    const LEASE: u8 = 2;
    const MARGIN: u8 = 1;
    const HOLD: u8 = LEASE - MARGIN;

    /// A way a grant ends that is not its holder's own release.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub enum End {
        /// Another party deleted the request.
        Deleted,
        /// `kubelock break`.
        Broken,
        /// `spec.lockName` changed.
        Repointed,
        /// The pod force-deleted or terminating, not confirmed stopped.
        PodGone,
        /// The Lock deleted and created again.
        LockRecreated,
    }

    pub const ALL_ENDS: [End; 5] = [End::Deleted, End::Broken, End::Repointed, End::PodGone, End::LockRecreated];

    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    enum Pod {
        Running,
        /// Force-deleted: no object, the process may still run (nothing will report on it).
        Gone,
        /// Deleted gracefully: the object has a deletionTimestamp, the process still runs.
        Terminating,
        /// The kubelet reported its containers terminated: the process is gone.
        Stopped,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    enum Client {
        /// No request of its own it knows of.
        Idle,
        /// Its request exists; its last read says waiting.
        Waiting,
        /// Its last read says granted.
        Holding,
        /// It saw its request gone or ended, or its deadline passed: it does not act again on
        /// this request (it may mark its release, and ask again once the request is gone).
        Done,
        /// Its process is gone.
        Dead,
    }

    #[derive(Clone, Debug, PartialEq, Eq, Hash)]
    struct Req {
        released: bool,
        broken: bool,
        repointed: bool,
        /// Status: granted by the Lock as it is.
        granted: bool,
        /// Status: the grant ended (written with the end, fenced).
        ended: bool,
        /// Status names a Lock that was deleted since.
        stale: bool,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
    struct Entry {
        client: u8,
        /// Ticks since the controller saw the last renewal (capped at the lease).
        age: u8,
    }

    #[derive(Clone, Debug, PartialEq, Eq, Hash)]
    pub struct State {
        lock: bool,
        /// Deleted, held back by a finalizer until no grant takes permits (`finalizer`).
        deleting: bool,
        holders: Vec<Entry>,
        draining: Vec<Entry>,
        queue: Vec<u8>,
        reqs: [Option<Req>; CLIENTS],
        pods: [Pod; CLIENTS],
        clients: [Client; CLIENTS],
        /// Ticks left before the client's local deadline.
        left: [u8; CLIENTS],
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub enum Action {
        Tick,
        Request(u8),
        Renew(u8),
        Read(u8),
        Release(u8),
        Reconcile,
        DeleteOthers(u8),
        Break(u8),
        Repoint(u8),
        ForceDeletePod(u8),
        DeletePod(u8),
        PodStopped(u8),
        DeleteLock,
        CreateLock,
    }

    pub struct Ends {
        /// `None`: the one rule. `Some(end)`: that end frees the permits at once.
        pub immediate: Option<End>,
        /// A deleted Lock stays (a finalizer) until its holders and draining grants are freed
        /// under the one rule, granting nothing meanwhile. Without it (main), the status goes
        /// with the Lock, and a recreated Lock knows of earlier grants only by the requests'
        /// status.
        pub finalizer: bool,
    }

    fn acting(s: &State, c: usize) -> bool {
        s.clients[c] == Client::Holding && s.left[c] > 0
    }

    fn pod_gone(p: Pod) -> bool {
        matches!(p, Pod::Gone | Pod::Terminating)
    }

    impl Ends {
        /// What ends the grant of client `c`, if anything: `Some(None)` frees at once (its own
        /// mark, a pod confirmed stopped, the lease passed), `Some(Some(end))` is an end by
        /// someone else.
        fn end_of(&self, s: &State, e: &Entry) -> Option<Option<End>> {
            let c = usize::from(e.client);
            match &s.reqs[c] {
                Some(r) if r.released => Some(None),
                _ if s.pods[c] == Pod::Stopped => Some(None),
                _ if e.age >= LEASE => Some(None),
                None => Some(Some(End::Deleted)),
                Some(_) if s.deleting => Some(Some(End::LockRecreated)),
                Some(r) if r.broken => Some(Some(End::Broken)),
                Some(r) if r.repointed => Some(Some(End::Repointed)),
                Some(_) if pod_gone(s.pods[c]) => Some(Some(End::PodGone)),
                Some(_) => None,
            }
        }

        fn frees_at_once(&self, end: End) -> bool {
            self.immediate == Some(end)
        }

        fn reconcile(&self, s: &mut State) {
            let free = |s: &mut State, c: usize| {
                if let Some(r) = &mut s.reqs[c] {
                    if r.released {
                        s.reqs[c] = None; // the controller deletes a released request
                    } else {
                        r.granted = false;
                        r.ended = true;
                    }
                }
            };
            // Holders.
            for e in std::mem::take(&mut s.holders) {
                let c = usize::from(e.client);
                match self.end_of(s, &e) {
                    None => s.holders.push(e),
                    Some(None) => free(s, c),
                    Some(Some(end)) => {
                        if let Some(r) = &mut s.reqs[c] {
                            r.granted = false;
                            r.ended = true;
                        }
                        if !self.frees_at_once(end) {
                            s.draining.push(e);
                        }
                    }
                }
            }
            // Draining: freed only when the holder can no longer act.
            for e in std::mem::take(&mut s.draining) {
                let c = usize::from(e.client);
                let own = s.reqs[c].as_ref().is_some_and(|r| r.released);
                if own || s.pods[c] == Pod::Stopped || e.age >= LEASE {
                    free(s, c);
                } else {
                    s.draining.push(e);
                }
            }
            // A deleted Lock held by its finalizer goes once nothing takes permits.
            if s.deleting {
                s.queue.clear();
                if s.holders.is_empty() && s.draining.is_empty() {
                    s.deleting = false;
                    s.lock = false;
                    for r in s.reqs.iter_mut().flatten() {
                        r.stale = true;
                    }
                }
                return;
            }
            // Requests an earlier Lock of this name granted; waiting requests of an earlier
            // Lock join the queue.
            for c in 0..CLIENTS {
                let Some(r) = &mut s.reqs[c] else { continue };
                if !r.stale {
                    continue;
                }
                r.stale = false;
                if r.granted {
                    r.granted = false;
                    r.ended = true;
                    if !self.frees_at_once(End::LockRecreated) {
                        // The countdown starts at the controller's first sight of it.
                        s.draining.push(Entry { client: c as u8, age: 0 });
                    }
                } else if !r.ended && !s.queue.contains(&(c as u8)) {
                    s.queue.push(c as u8);
                }
            }
            // The queue: requests gone, released or no longer for this Lock leave it.
            let reqs = s.reqs.clone();
            s.queue.retain(|c| {
                reqs[usize::from(*c)].as_ref().is_some_and(|r| !r.released && !r.repointed && !r.broken && !r.ended)
            });
            for c in 0..CLIENTS {
                if let Some(r) = &s.reqs[c]
                    && r.released
                    && !r.granted
                    && !s.draining.iter().any(|e| usize::from(e.client) == c)
                {
                    s.reqs[c] = None;
                }
            }
            // Grants, FIFO, into what holders and draining leave free.
            while s.holders.len() + s.draining.len() < PERMITS && !s.queue.is_empty() {
                let c = s.queue.remove(0);
                s.holders.push(Entry { client: c, age: 0 });
                if let Some(r) = &mut s.reqs[usize::from(c)] {
                    r.granted = true;
                }
            }
            s.holders.sort();
            s.draining.sort();
        }
    }

    impl Model for Ends {
        type State = State;
        type Action = Action;

        fn init_states(&self) -> Vec<State> {
            vec![State {
                lock: true,
                deleting: false,
                holders: vec![],
                draining: vec![],
                queue: vec![],
                reqs: std::array::from_fn(|_| None),
                pods: [Pod::Running; CLIENTS],
                clients: [Client::Idle; CLIENTS],
                left: [0; CLIENTS],
            }]
        }

        fn actions(&self, s: &State, actions: &mut Vec<Action>) {
            actions.push(Action::Tick);
            if s.lock {
                actions.push(Action::Reconcile);
                if !s.deleting {
                    actions.push(Action::DeleteLock);
                }
            } else {
                actions.push(Action::CreateLock);
            }
            for c in 0..CLIENTS {
                let i = c as u8;
                let alive = s.clients[c] != Client::Dead;
                match s.clients[c] {
                    Client::Idle | Client::Done if alive && s.reqs[c].is_none() && s.pods[c] == Pod::Running => {
                        actions.push(Action::Request(i))
                    }
                    _ => {}
                }
                if matches!(s.clients[c], Client::Waiting | Client::Holding) && s.left[c] > 0 {
                    actions.push(Action::Renew(i));
                }
                if matches!(s.clients[c], Client::Waiting | Client::Holding) {
                    actions.push(Action::Read(i));
                }
                if alive && s.clients[c] != Client::Idle && s.reqs[c].as_ref().is_some_and(|r| !r.released) {
                    actions.push(Action::Release(i));
                }
                if let Some(r) = &s.reqs[c] {
                    if !r.released {
                        actions.push(Action::DeleteOthers(i));
                    }
                    if r.granted && !r.broken {
                        actions.push(Action::Break(i));
                    }
                    if !r.repointed {
                        actions.push(Action::Repoint(i));
                    }
                }
                match s.pods[c] {
                    Pod::Running => {
                        actions.push(Action::ForceDeletePod(i));
                        actions.push(Action::DeletePod(i));
                    }
                    Pod::Terminating => {
                        actions.push(Action::ForceDeletePod(i));
                        actions.push(Action::PodStopped(i));
                    }
                    _ => {}
                }
            }
        }

        fn next_state(&self, last: &State, action: Action) -> Option<State> {
            let mut s = last.clone();
            match action {
                Action::Tick => {
                    for c in 0..CLIENTS {
                        s.left[c] = s.left[c].saturating_sub(1);
                        // Passing the deadline is final (the model above).
                        if s.left[c] == 0 && matches!(s.clients[c], Client::Waiting | Client::Holding) {
                            s.clients[c] = Client::Done;
                        }
                    }
                    for e in s.holders.iter_mut().chain(s.draining.iter_mut()) {
                        e.age = (e.age + 1).min(LEASE);
                    }
                }
                Action::Request(c) => {
                    let c = usize::from(c);
                    s.reqs[c] = Some(Req {
                        released: false,
                        broken: false,
                        repointed: false,
                        granted: false,
                        ended: false,
                        stale: !s.lock,
                    });
                    if s.lock && !s.deleting {
                        s.queue.push(c as u8);
                    }
                    s.clients[c] = Client::Waiting;
                    s.left[c] = HOLD;
                }
                Action::Renew(c) => {
                    let ci = usize::from(c);
                    match &s.reqs[ci] {
                        // 404, or the answer says the grant ended (or the request is not for
                        // this Lock any more): stop.
                        None => s.clients[ci] = Client::Done,
                        Some(r) if r.ended || r.repointed => s.clients[ci] = Client::Done,
                        Some(r) => {
                            if r.granted {
                                s.clients[ci] = Client::Holding;
                            }
                            s.left[ci] = HOLD;
                            for e in s.holders.iter_mut().chain(s.draining.iter_mut()) {
                                if e.client == c {
                                    e.age = 0;
                                }
                            }
                        }
                    }
                }
                Action::Read(c) => {
                    let c = usize::from(c);
                    match &s.reqs[c] {
                        None => s.clients[c] = Client::Done,
                        Some(r) if r.ended || r.repointed => s.clients[c] = Client::Done,
                        Some(r) if r.granted => s.clients[c] = Client::Holding,
                        Some(_) => {}
                    }
                }
                Action::Release(c) => {
                    // It stops acting first, then marks its release.
                    let c = usize::from(c);
                    s.clients[c] = Client::Done;
                    if let Some(r) = &mut s.reqs[c] {
                        r.released = true;
                    }
                }
                Action::Reconcile => self.reconcile(&mut s),
                Action::DeleteOthers(c) => s.reqs[usize::from(c)] = None,
                Action::Break(c) => {
                    if let Some(r) = &mut s.reqs[usize::from(c)] {
                        r.broken = true;
                    }
                }
                Action::Repoint(c) => {
                    if let Some(r) = &mut s.reqs[usize::from(c)] {
                        r.repointed = true;
                    }
                }
                Action::ForceDeletePod(c) => s.pods[usize::from(c)] = Pod::Gone,
                Action::DeletePod(c) => s.pods[usize::from(c)] = Pod::Terminating,
                Action::PodStopped(c) => {
                    let c = usize::from(c);
                    s.pods[c] = Pod::Stopped;
                    s.clients[c] = Client::Dead;
                    s.left[c] = 0;
                }
                Action::DeleteLock if self.finalizer => s.deleting = true,
                Action::DeleteLock => {
                    s.lock = false;
                    s.holders.clear();
                    s.draining.clear();
                    s.queue.clear();
                    for r in s.reqs.iter_mut().flatten() {
                        r.stale = true;
                    }
                }
                Action::CreateLock => s.lock = true,
            }
            Some(s)
        }

        fn properties(&self) -> Vec<Property<Self>> {
            vec![
                Property::always(CLIENTS_ACTING, |_, s: &State| {
                    (0..CLIENTS).filter(|&c| acting(s, c)).count() <= PERMITS
                }),
                Property::always(STORE_TAKEN, |_, s: &State| s.holders.len() + s.draining.len() <= PERMITS),
                Property::sometimes(DRAINING_WHILE_ACTING, |_, s: &State| {
                    s.draining.iter().any(|e| acting(s, usize::from(e.client)))
                }),
                Property::sometimes(GRANT_AFTER_DRAIN, |_, s: &State| {
                    s.holders.iter().any(|e| acting(s, usize::from(e.client)))
                        && (0..CLIENTS).any(|c| s.clients[c] == Client::Done && s.pods[c] == Pod::Gone)
                }),
            ]
        }
    }

    pub const CLIENTS_ACTING: &str = "permits of clients acting as holder <= permits";
    pub const STORE_TAKEN: &str = "store: holders + draining <= permits";
    pub const DRAINING_WHILE_ACTING: &str = "a draining grant's holder still acts";
    pub const GRANT_AFTER_DRAIN: &str = "a successor acts after a pod force-deleted";

    /// Every reachable state; returns (states, seconds, properties with a discovery).
    pub fn check(immediate: Option<End>, finalizer: bool, cap: usize) -> (usize, f64, Vec<&'static str>) {
        let start = std::time::Instant::now();
        let checker = Ends { immediate, finalizer }.checker().threads(2).target_state_count(cap).spawn_bfs().join();
        let found: Vec<&'static str> = checker.discoveries().keys().copied().collect();
        (checker.unique_state_count(), start.elapsed().as_secs_f64(), found)
    }

    /// A shortest counterexample to `property`, as text, if there is one.
    pub fn counterexample(immediate: Option<End>, finalizer: bool, property: &'static str) -> Option<String> {
        let checker = Ends { immediate, finalizer }
            .checker()
            .finish_when(stateright::HasDiscoveries::AnyOf([property].into()))
            .target_state_count(5_000_000)
            .spawn_bfs()
            .join();
        checker.discovery(property).map(|p| {
            let mut out = String::new();
            for (state, action) in p.into_vec() {
                out.push_str(&format!("{state:?}\n  -> {action:?}\n"));
            }
            out
        })
    }
}

/// Every end of a grant with the one rule, the fenced expiry, and a deleted Lock kept by a
/// finalizer until its grants are freed: no two clients act at once, and the store never
/// lists more than the permits, in every reachable state. The situations the rule is for are
/// reached (not vacuous).
#[test]
fn every_end_of_a_grant_is_safe_with_the_one_rule_and_a_lock_finalizer() {
    let (states, seconds, found) = ends::check(None, true, 20_000_000);
    println!("ends, one rule, Lock finalizer: {states} distinct states, {seconds:.1}s, discoveries {found:?}");
    for property in [ends::CLIENTS_ACTING, ends::STORE_TAKEN] {
        if found.contains(&property) {
            let trace = ends::counterexample(None, true, property).unwrap_or_default();
            panic!("violated: {property}:\n{trace}");
        }
    }
    assert!(found.contains(&ends::DRAINING_WHILE_ACTING), "never reached: {}", ends::DRAINING_WHILE_ACTING);
    assert!(found.contains(&ends::GRANT_AFTER_DRAIN), "never reached: {}", ends::GRANT_AFTER_DRAIN);
}

/// The one rule as main ships it, where a deleted Lock takes its status with it: a holder's
/// request deleted by another party after its Lock was deleted (or a grant already draining
/// when the Lock is deleted) leaves nothing for the recreated Lock to drain, and it grants
/// the next request while the first holder still acts.
#[test]
fn a_recreated_lock_forgets_a_grant_whose_request_is_gone() {
    let trace = ends::counterexample(None, false, ends::CLIENTS_ACTING)
        .unwrap_or_else(|| panic!("no counterexample to {} without a Lock finalizer", ends::CLIENTS_ACTING));
    assert!(trace.contains("DeleteLock") && trace.contains("DeleteOthers"), "{trace}");
    println!("one rule without a Lock finalizer, counterexample:\n{trace}");
}

/// Each end by someone else that freed the permits at once (main before the one rule): two
/// clients act at once, and stateright finds how.
#[test]
fn an_end_that_frees_at_once_lets_two_holders_act() {
    for end in ends::ALL_ENDS {
        let trace = ends::counterexample(Some(end), true, ends::CLIENTS_ACTING)
            .unwrap_or_else(|| panic!("{end:?} freed at once: no counterexample to {}", ends::CLIENTS_ACTING));
        println!("{end:?} freed at once, counterexample:\n{trace}");
    }
}
