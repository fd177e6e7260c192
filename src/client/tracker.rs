//! The pure half of a holder: what it believes about one LockRequest, from the events it
//! sees (its own writes, its request, the Lock) and readings of `CLOCK_BOOTTIME`. No I/O,
//! no clock reads: every input carries the time it was observed, so the rules can be
//! unit-tested without a server.
//!
//! The rules (docs/design.md, "Client protocol"):
//! - granted when the request (name and UID) is in `Lock.status.holders` (token from there)
//!   or its own `status.phase` is `Granted`, whichever is seen first;
//! - `base` = the boot time read *before* sending the last write (create or renewal) that
//!   succeeded; deadline = base + granted lease − margin, margin = max(lease/10, 200ms)
//!   unless configured;
//! - lost, finally, when the deadline passes, the request becomes `Expired`/`Rejected`,
//!   disappears (or is recreated with another UID), the Lock is deleted or recreated, or a
//!   Lock status newer than our grant no longer lists us. Nothing revives a lost tracker;
//!   the caller creates a new request.

use std::time::Duration;

use kube::ResourceExt as _;
use serde::Serialize;

use super::clock::BootInstant;
use crate::api::{ConditionType, Lock, LockRequest, Phase, duration};

/// The smallest safety margin taken off the lease by default.
pub const MIN_MARGIN: Duration = Duration::from_millis(200);

/// Renewal period while the lease is not known yet (a third of the default 30s lease).
pub const DEFAULT_RENEW_INTERVAL: Duration = Duration::from_secs(10);

/// The default margin for a lease: max(lease/10, 200ms).
pub fn default_margin(lease: Duration) -> Duration {
    (lease / 10).max(MIN_MARGIN)
}

/// The local deadline: `base + lease − margin`. A margin not smaller than the lease leaves
/// no time at all (the deadline is `base`).
pub fn deadline(base: BootInstant, lease: Duration, margin: Duration) -> BootInstant {
    base.saturating_add(lease.saturating_sub(margin))
}

/// Why a holder no longer holds (or a waiter will never hold).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "camelCase")]
pub enum LostReason {
    /// The local deadline passed without a successful renewal (API server unreachable, the
    /// process was frozen, the machine was suspended...).
    DeadlinePassed,
    /// The controller expired the grant (`phase: Expired`): lease ran out on its clock, the
    /// pod went away, an administrator broke it, or the Lock was deleted.
    Expired {
        /// The `Granted` condition's reason (`LeaseExpired`, `PodGone`, `Broken`, `LockDeleted`...).
        cause: String,
        /// The controller's message.
        message: String,
    },
    /// The controller refused the request (`phase: Rejected`), e.g. more permits than the Lock has.
    Rejected {
        /// The controller's message.
        message: String,
    },
    /// The request was deleted, recreated under the same name, or marked released by someone
    /// else.
    RequestDeleted,
    /// A Lock status written after our grant no longer lists us.
    RemovedFromLock,
    /// The Lock was deleted or recreated (another UID).
    LockDeleted,
    /// We released it ourselves.
    Released,
}

impl std::fmt::Display for LostReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LostReason::DeadlinePassed => write!(f, "the local lease deadline passed without a successful renewal"),
            LostReason::Expired { cause, message } if message.is_empty() => {
                write!(f, "the controller expired the grant ({cause})")
            }
            LostReason::Expired { cause, message } => {
                write!(f, "the controller expired the grant ({cause}: {message})")
            }
            LostReason::Rejected { message } => write!(f, "the controller rejected the request: {message}"),
            LostReason::RequestDeleted => write!(f, "the lock request was deleted by someone else"),
            LostReason::RemovedFromLock => write!(f, "the lock's status no longer lists this holder"),
            LostReason::LockDeleted => write!(f, "the lock was deleted"),
            LostReason::Released => write!(f, "released"),
        }
    }
}

/// A grant as seen by its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Fencing token.
    pub token: i64,
    /// The Lock's `metadata.uid` (tokens are unique per Lock UID); empty if not known yet.
    pub lock_uid: String,
    /// The effective lease of the grant.
    pub lease: Duration,
}

/// What the holder believes now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockState {
    /// Queued; `position` is the 0-based place in the queue when the controller said so.
    Waiting {
        /// 0 = next.
        position: Option<i32>,
    },
    /// Holding until `deadline` (on `CLOCK_BOOTTIME`) unless renewed.
    Holding {
        /// Fencing token.
        token: i64,
        /// The Lock's UID.
        lock_uid: String,
        /// Granted lease.
        lease: Duration,
        /// Past this instant the holder must act as not holding.
        deadline: BootInstant,
    },
    /// Not holding, for good. `token` is the token of the grant that was lost, if any.
    Lost {
        /// Why.
        reason: LostReason,
        /// The lost grant's token.
        token: Option<i64>,
    },
}

impl LockState {
    /// Holding, and the deadline has not passed at `now`.
    pub fn is_holding_at(&self, now: BootInstant) -> bool {
        matches!(self, LockState::Holding { deadline, .. } if now < *deadline)
    }

    /// Lost for good.
    pub fn is_lost(&self) -> bool {
        matches!(self, LockState::Lost { .. })
    }
}

/// The holder's view of one request. Feed it every observation; read [`Tracker::state`].
#[derive(Debug, Clone)]
pub struct Tracker {
    name: String,
    uid: String,
    requested_lease: Option<Duration>,
    margin: Option<Duration>,
    /// Boot time read before sending the last successful write.
    base: Option<BootInstant>,
    /// The grant, once seen (kept after loss to report the token).
    grant: Option<Grant>,
    /// A Lock status has listed us.
    listed: bool,
    /// The Lock's lease from its spec (for the renew period while waiting).
    lock_lease: Option<Duration>,
    state: LockState,
}

impl Tracker {
    /// A tracker for the request `name`/`uid`. `requested_lease` is `spec.leaseDuration` if
    /// set; `margin` overrides the default safety margin.
    pub fn new(
        name: impl Into<String>,
        uid: impl Into<String>,
        requested_lease: Option<Duration>,
        margin: Option<Duration>,
    ) -> Self {
        Self {
            name: name.into(),
            uid: uid.into(),
            requested_lease,
            margin,
            base: None,
            grant: None,
            listed: false,
            lock_lease: None,
            state: LockState::Waiting { position: None },
        }
    }

    /// The current belief. (A `Holding` state may be past its deadline if no event came in
    /// since: check [`LockState::is_holding_at`] or call [`Tracker::on_tick`].)
    pub fn state(&self) -> &LockState {
        &self.state
    }

    /// Request name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Request UID.
    pub fn uid(&self) -> &str {
        &self.uid
    }

    /// The deadline to arm a timer for: while holding, the grant's; while waiting, the
    /// waiter's (see [`Tracker::waiting_deadline`]).
    pub fn deadline(&self) -> Option<BootInstant> {
        match &self.state {
            LockState::Holding { deadline, .. } => Some(*deadline),
            LockState::Waiting { .. } => self.waiting_deadline(),
            LockState::Lost { .. } => None,
        }
    }

    /// A waiter keeps a deadline too: base + the lease it would be granted − margin. Past
    /// it the request is lost for good, like a grant: a waiter that could not renew for a
    /// lease (frozen, cut off) may have been granted and expired meanwhile, and a renewal it
    /// sends late must not give it a fresh deadline while its successor is granted (the
    /// model check, tests/model_check.rs, found that interleaving). The caller asks again
    /// with a new request. Unknown while neither the requested nor the Lock's lease is
    /// known; the controller's fenced expiry covers that case.
    pub fn waiting_deadline(&self) -> Option<BootInstant> {
        let base = self.base?;
        let lease = self.fallback_lease()?;
        Some(deadline(base, lease, self.margin_for(lease)))
    }

    /// The base of the deadline: boot time before the last successful write.
    pub fn base(&self) -> Option<BootInstant> {
        self.base
    }

    /// How often to renew: a third of the granted lease; while waiting, a third of the
    /// shortest lease that may be granted (the requested one, the Lock's), 10s if unknown.
    pub fn renew_interval(&self) -> Duration {
        let lease = match &self.grant {
            Some(g) => Some(g.lease),
            None => match (self.requested_lease, self.lock_lease) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
        };
        lease.map_or(DEFAULT_RENEW_INTERVAL, |l| (l / 3).max(Duration::from_millis(1)))
    }

    /// The margin in force for `lease`.
    pub fn margin_for(&self, lease: Duration) -> Duration {
        self.margin.unwrap_or_else(|| default_margin(lease))
    }

    /// Marks the state lost unless it already is.
    fn lose(&mut self, reason: LostReason) {
        if !self.state.is_lost() {
            self.state = LockState::Lost { reason, token: self.grant.as_ref().map(|g| g.token) };
        }
    }

    /// Time passes: past the deadline (holding or waiting), lost.
    pub fn on_tick(&mut self, now: BootInstant) {
        if self.deadline().is_some_and(|deadline| now >= deadline) {
            self.lose(LostReason::DeadlinePassed);
        }
    }

    /// A write (the create or a renewal) sent at `sent_at` succeeded; `now` is when the
    /// answer arrived, `returned` the object the server returned.
    pub fn on_write_ok(&mut self, sent_at: BootInstant, now: BootInstant, returned: Option<&LockRequest>) {
        // The deadline is checked before anything can move it: a renewal answered after
        // the deadline passed does not resurrect the grant.
        self.on_tick(now);
        if self.state.is_lost() {
            return;
        }
        self.base = Some(self.base.map_or(sent_at, |b| b.max(sent_at)));
        if let LockState::Holding { lease, deadline, .. } = &mut self.state {
            let candidate = self::deadline(sent_at, *lease, self.margin.unwrap_or_else(|| default_margin(*lease)));
            *deadline = (*deadline).max(candidate);
        } else if let Some(grant) = self.grant.clone() {
            // Granted earlier but no base then (an adopted request): holding from now on.
            self.hold(grant, now);
        }
        if let Some(obj) = returned {
            self.on_request(obj, now);
        }
    }

    /// Our request as the server has it now (watch event or a write's answer).
    pub fn on_request(&mut self, obj: &LockRequest, now: BootInstant) {
        self.on_tick(now);
        if self.state.is_lost() {
            return;
        }
        // Recreated under our name, being deleted, or released by someone else: ours is gone.
        if obj.uid().as_deref() != Some(self.uid.as_str())
            || obj.name_any() != self.name
            || obj.metadata.deletion_timestamp.is_some()
            || obj.spec.released
        {
            self.lose(LostReason::RequestDeleted);
            return;
        }
        let status = obj.status.clone().unwrap_or_default();
        match obj.phase() {
            Phase::Pending => {
                if let LockState::Waiting { position } = &mut self.state {
                    *position = status.position;
                }
            }
            Phase::Granted => {
                let lease = status.lease_duration.as_deref().and_then(|d| duration::parse(d).ok());
                if let (Some(token), Some(lease)) = (status.token, lease.or_else(|| self.fallback_lease())) {
                    let lock_uid = status.lock_uid.clone().unwrap_or_default();
                    self.on_grant(Grant { token, lock_uid, lease }, now);
                }
            }
            Phase::Expired => {
                let cond = ConditionType::Granted.find(&status.conditions);
                let cause =
                    cond.map(|c| c.reason.clone()).filter(|r| !r.is_empty()).unwrap_or_else(|| "Expired".into());
                let message = status.message.clone().or_else(|| cond.map(|c| c.message.clone())).unwrap_or_default();
                self.lose(LostReason::Expired { cause, message });
            }
            Phase::Rejected => {
                let message = status.message.clone().unwrap_or_default();
                self.lose(LostReason::Rejected { message });
            }
        }
    }

    /// Our request is gone (deleted, or absent from a fresh list).
    pub fn on_request_gone(&mut self, now: BootInstant) {
        self.on_tick(now);
        self.lose(LostReason::RequestDeleted);
    }

    /// The Lock as the server has it now.
    pub fn on_lock(&mut self, lock: &Lock, now: BootInstant) {
        self.on_tick(now);
        if self.state.is_lost() {
            return;
        }
        self.lock_lease = duration::parse(&lock.spec.lease_duration).ok();
        let lock_uid = lock.uid().unwrap_or_default();
        if let Some(g) = &self.grant
            && !g.lock_uid.is_empty()
            && g.lock_uid != lock_uid
        {
            // Another Lock of the same name: ours was deleted (a status event of the old
            // Lock arriving late has the old UID and is taken as a normal observation).
            self.lose(LostReason::LockDeleted);
            return;
        }
        let status = lock.status.clone().unwrap_or_default();
        let me = status.holders.iter().find(|h| h.request == self.name && h.request_uid == self.uid);
        match me {
            Some(h) => {
                self.listed = true;
                let lease = duration::parse(&h.lease_duration).ok().or_else(|| self.fallback_lease());
                if let Some(lease) = lease {
                    self.on_grant(Grant { token: h.token, lock_uid: lock_uid.clone(), lease }, now);
                }
                // Learn the Lock UID if the grant came from the request without it.
                if let Some(g) = &mut self.grant
                    && g.lock_uid.is_empty()
                {
                    g.lock_uid = lock_uid.clone();
                    if let LockState::Holding { lock_uid: l, .. } = &mut self.state {
                        *l = lock_uid;
                    }
                }
            }
            None => {
                if let Some(g) = &self.grant {
                    // Not listed in a status written after our grant (it listed us before,
                    // or its fencing token shows it already counted our grant): removed.
                    if self.listed || status.fencing_token >= g.token {
                        self.lose(LostReason::RemovedFromLock);
                    }
                } else if let LockState::Waiting { position } = &mut self.state
                    && let Some(i) = status.queue.iter().position(|q| *q == self.name)
                {
                    *position = Some(i as i32);
                }
            }
        }
    }

    /// The Lock is gone (deleted, or absent from a fresh list). `uid` is the UID of the
    /// deleted object if known. Only a grant is lost; a waiter keeps waiting.
    pub fn on_lock_gone(&mut self, uid: Option<&str>, now: BootInstant) {
        self.on_tick(now);
        if let Some(g) = &self.grant {
            let same = match uid {
                Some(u) if !g.lock_uid.is_empty() => u == g.lock_uid,
                _ => true,
            };
            if same {
                self.lose(LostReason::LockDeleted);
            }
        }
    }

    /// We released (or are about to release) the request.
    pub fn on_released(&mut self) {
        self.lose(LostReason::Released);
    }

    /// The lease when the grant does not say (older controllers): the shortest known.
    fn fallback_lease(&self) -> Option<Duration> {
        match (self.requested_lease, self.lock_lease) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn on_grant(&mut self, grant: Grant, now: BootInstant) {
        match &self.grant {
            Some(g) if g.token == grant.token => {}
            Some(_) => {
                // Another token for the same request: cannot happen with a correct
                // controller (a request is granted once). Trust nothing.
                self.lose(LostReason::RemovedFromLock);
                return;
            }
            None => self.grant = Some(grant.clone()),
        }
        if matches!(self.state, LockState::Waiting { .. }) {
            self.hold(grant, now);
        }
    }

    fn hold(&mut self, grant: Grant, now: BootInstant) {
        let Some(base) = self.base else {
            // Adopted request, not renewed by us yet: holding once a renewal succeeds.
            return;
        };
        let margin = self.margin_for(grant.lease);
        let deadline = deadline(base, grant.lease, margin);
        self.state = LockState::Holding { token: grant.token, lock_uid: grant.lock_uid, lease: grant.lease, deadline };
        self.on_tick(now);
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};

    use super::*;
    use crate::api::{Holder, LockRequestSpec, LockRequestStatus, LockSpec, LockStatus};

    fn at(ms: u64) -> BootInstant {
        BootInstant::from_since_boot(Duration::from_millis(ms))
    }
    const S: Duration = Duration::from_secs(1);

    fn request(name: &str, uid: &str, status: Option<LockRequestStatus>) -> LockRequest {
        let mut r = LockRequest::new(
            name,
            LockRequestSpec {
                lock_name: "db".into(),
                holder_identity: "me".into(),
                permits: 1,
                lease_duration: None,
                renew_time: None,
                pod_ref: None,
                released: false,
            },
        );
        r.metadata.uid = Some(uid.into());
        r.status = status;
        r
    }

    fn granted(token: i64, lease: &str) -> Option<LockRequestStatus> {
        Some(LockRequestStatus {
            phase: Some(Phase::Granted),
            token: Some(token),
            lease_duration: Some(lease.into()),
            lock_uid: Some("lock-uid".into()),
            ..Default::default()
        })
    }

    fn lock(uid: &str, fencing: i64, holders: &[(&str, &str, i64)]) -> Lock {
        let mut l = Lock::new("db", LockSpec { lease_duration: "30s".into(), ..Default::default() });
        l.metadata.uid = Some(uid.into());
        l.status = Some(LockStatus {
            fencing_token: fencing,
            holders: holders
                .iter()
                .map(|(r, u, t)| Holder {
                    request: r.to_string(),
                    request_uid: u.to_string(),
                    holder: "x".into(),
                    permits: 1,
                    token: *t,
                    granted_at: MicroTime(jiff::Timestamp::UNIX_EPOCH),
                    lease_duration: "10s".into(),
                    pod_ref: None,
                })
                .collect(),
            ..Default::default()
        });
        l
    }

    fn new_tracker() -> Tracker {
        let mut t = Tracker::new("db-abcde", "u1", None, None);
        t.on_write_ok(at(1000), at(1010), None); // the create
        t
    }

    #[test]
    fn margin_and_deadline_arithmetic() {
        assert_eq!(default_margin(Duration::from_secs(30)), Duration::from_secs(3));
        assert_eq!(default_margin(Duration::from_secs(1)), Duration::from_millis(200));
        assert_eq!(default_margin(Duration::from_millis(500)), Duration::from_millis(200));
        assert_eq!(deadline(at(1000), 15 * S, Duration::from_millis(1500)), at(14_500));
        // A margin as large as the lease leaves nothing.
        assert_eq!(deadline(at(1000), S, 2 * S), at(1000));
    }

    #[test]
    fn grant_via_request_uses_base_before_create() {
        let mut t = new_tracker();
        assert_eq!(t.state(), &LockState::Waiting { position: None });
        t.on_request(&request("db-abcde", "u1", granted(7, "10s")), at(2000));
        // base 1000ms (read before the create) + 10s − max(1s, 200ms)
        assert_eq!(
            t.state(),
            &LockState::Holding { token: 7, lock_uid: "lock-uid".into(), lease: 10 * S, deadline: at(10_000) }
        );
        assert_eq!(t.renew_interval(), Duration::from_nanos(3_333_333_333));
    }

    #[test]
    fn grant_via_lock_status_first() {
        let mut t = new_tracker();
        t.on_lock(&lock("L", 4, &[("db-abcde", "u1", 4)]), at(1500));
        assert!(
            matches!(t.state(), LockState::Holding { token: 4, lock_uid, deadline, .. } if lock_uid == "L" && *deadline == at(10_000))
        );
        // The mirror arrives later and changes nothing.
        let before = t.state().clone();
        t.on_request(&request("db-abcde", "u1", granted(4, "10s")), at(1600));
        assert_eq!(t.state(), &before);
    }

    #[test]
    fn same_name_other_uid_in_lock_is_not_us() {
        let mut t = new_tracker();
        t.on_lock(&lock("L", 4, &[("db-abcde", "OTHER", 4)]), at(1500));
        assert!(matches!(t.state(), LockState::Waiting { .. }));
    }

    #[test]
    fn renewal_extends_but_not_after_the_deadline() {
        let mut t = new_tracker();
        t.on_request(&request("db-abcde", "u1", granted(1, "10s")), at(2000));
        t.on_write_ok(at(4000), at(4100), None);
        assert_eq!(t.deadline(), Some(at(13_000)));
        // An older renewal's answer arriving late never shortens the deadline.
        t.on_write_ok(at(3000), at(4200), None);
        assert_eq!(t.deadline(), Some(at(13_000)));
        // Answer that arrives after the deadline passed: lost, not extended.
        t.on_write_ok(at(12_000), at(13_000), None);
        assert_eq!(t.state(), &LockState::Lost { reason: LostReason::DeadlinePassed, token: Some(1) });
        // Nothing revives it.
        t.on_request(&request("db-abcde", "u1", granted(1, "10s")), at(13_001));
        t.on_write_ok(at(13_002), at(13_003), None);
        assert!(t.state().is_lost());
        assert_eq!(t.deadline(), None);
    }

    #[test]
    fn tick_loses_exactly_at_the_deadline() {
        let mut t = new_tracker();
        t.on_request(&request("db-abcde", "u1", granted(1, "10s")), at(2000));
        t.on_tick(at(9_999));
        assert!(t.state().is_holding_at(at(9_999)));
        assert!(!t.state().is_holding_at(at(10_000)));
        t.on_tick(at(10_000));
        assert!(matches!(t.state(), LockState::Lost { reason: LostReason::DeadlinePassed, .. }));
    }

    #[test]
    fn late_grant_with_stale_base_is_lost_at_once() {
        let mut t = new_tracker();
        // Frozen while waiting: the grant is seen long after the last renewal.
        t.on_request(&request("db-abcde", "u1", granted(3, "10s")), at(60_000));
        assert!(matches!(t.state(), LockState::Lost { reason: LostReason::DeadlinePassed, token: Some(3) }));
    }

    #[test]
    fn a_waiter_past_its_deadline_is_lost_and_a_late_renewal_does_not_revive_it() {
        // The interleaving the model check found: frozen while waiting, granted and expired
        // meanwhile, a renewal sent on waking lands and is answered before the expiry.
        let mut t = new_tracker(); // created at 1000 ms
        t.on_lock(&lock("lock-uid", 0, &[]), at(1100)); // the Lock's lease: 30s
        assert_eq!(t.waiting_deadline(), Some(at(1000 + 27_000)));
        t.on_tick(at(1000 + 27_000));
        assert!(matches!(t.state(), LockState::Lost { reason: LostReason::DeadlinePassed, .. }));
        t.on_write_ok(at(40_000), at(40_010), Some(&request("db-abcde", "u1", granted(1, "30s"))));
        t.on_lock(&lock("lock-uid", 1, &[("db-abcde", "u1", 1)]), at(40_020));
        assert!(t.state().is_lost(), "{:?}", t.state());
        // A waiter that renews in time keeps waiting, and holds from its last renewal.
        let mut t = new_tracker();
        t.on_lock(&lock("lock-uid", 0, &[]), at(1100));
        t.on_write_ok(at(20_000), at(20_010), None);
        t.on_tick(at(40_000));
        assert!(matches!(t.state(), LockState::Waiting { .. }));
        t.on_request(&request("db-abcde", "u1", granted(1, "30s")), at(40_100));
        assert_eq!(t.deadline(), Some(at(20_000 + 27_000)));
    }

    #[test]
    fn configured_margin() {
        let mut t = Tracker::new("r", "u", Some(5 * S), Some(Duration::from_millis(100)));
        t.on_write_ok(at(0), at(1), None);
        assert_eq!(t.renew_interval(), Duration::from_nanos(1_666_666_666));
        t.on_request(&request("r", "u", granted(1, "5s")), at(2));
        assert_eq!(t.deadline(), Some(at(4_900)));
    }

    #[test]
    fn expired_phase_is_lost_with_cause() {
        let mut t = new_tracker();
        t.on_request(&request("db-abcde", "u1", granted(2, "10s")), at(2000));
        let mut st = granted(2, "10s").unwrap();
        st.phase = Some(Phase::Expired);
        st.message = Some("broken by alice: maintenance".into());
        st.conditions = vec![Condition {
            type_: ConditionType::Granted.as_str().into(),
            status: crate::api::status_string(false).into(),
            reason: crate::api::Reason::Broken.as_str().into(),
            message: String::new(),
            last_transition_time: Time(jiff::Timestamp::UNIX_EPOCH),
            observed_generation: None,
        }];
        t.on_request(&request("db-abcde", "u1", Some(st)), at(3000));
        assert_eq!(
            t.state(),
            &LockState::Lost {
                reason: LostReason::Expired { cause: "Broken".into(), message: "broken by alice: maintenance".into() },
                token: Some(2)
            }
        );
    }

    #[test]
    fn rejected_while_waiting() {
        let mut t = new_tracker();
        let st =
            LockRequestStatus { phase: Some(Phase::Rejected), message: Some("too many".into()), ..Default::default() };
        t.on_request(&request("db-abcde", "u1", Some(st)), at(1100));
        assert_eq!(
            t.state(),
            &LockState::Lost { reason: LostReason::Rejected { message: "too many".into() }, token: None }
        );
    }

    #[test]
    fn request_deleted_or_recreated() {
        let mut t = new_tracker();
        t.on_request(&request("db-abcde", "u1", granted(2, "10s")), at(2000));
        t.on_request(&request("db-abcde", "u2", None), at(2100));
        assert!(matches!(t.state(), LockState::Lost { reason: LostReason::RequestDeleted, .. }));
        let mut t = new_tracker();
        t.on_request_gone(at(1100));
        assert!(matches!(t.state(), LockState::Lost { reason: LostReason::RequestDeleted, token: None }));
    }

    #[test]
    fn lock_status_without_us_after_listing_us() {
        let mut t = new_tracker();
        t.on_lock(&lock("L", 4, &[("db-abcde", "u1", 4)]), at(1500));
        t.on_lock(&lock("L", 5, &[("other", "u9", 5)]), at(1600));
        assert!(matches!(t.state(), LockState::Lost { reason: LostReason::RemovedFromLock, token: Some(4) }));
    }

    #[test]
    fn stale_lock_status_does_not_revoke_a_grant_seen_on_the_request() {
        let mut t = new_tracker();
        t.on_request(&request("db-abcde", "u1", granted(4, "10s")), at(1500));
        // A Lock status from before our grant (token 3 issued, not ours yet): ignore.
        t.on_lock(&lock("lock-uid", 3, &[("prev", "u0", 3)]), at(1600));
        assert!(matches!(t.state(), LockState::Holding { token: 4, .. }));
        // A status that already issued our token but does not list us: removed.
        t.on_lock(&lock("lock-uid", 5, &[("next", "u5", 5)]), at(1700));
        assert!(matches!(t.state(), LockState::Lost { reason: LostReason::RemovedFromLock, .. }));
    }

    #[test]
    fn lock_deleted_or_recreated() {
        let mut t = new_tracker();
        t.on_lock(&lock("L", 1, &[("db-abcde", "u1", 1)]), at(1500));
        t.on_lock(&lock("L2", 0, &[]), at(1600));
        assert!(matches!(t.state(), LockState::Lost { reason: LostReason::LockDeleted, .. }));

        let mut t = new_tracker();
        t.on_lock(&lock("L", 1, &[("db-abcde", "u1", 1)]), at(1500));
        t.on_lock_gone(Some("OLD"), at(1600)); // a late delete of an older Lock
        assert!(matches!(t.state(), LockState::Holding { .. }));
        t.on_lock_gone(Some("L"), at(1700));
        assert!(matches!(t.state(), LockState::Lost { reason: LostReason::LockDeleted, .. }));

        // A waiter survives the Lock's deletion (its request waits for a new Lock).
        let mut t = new_tracker();
        t.on_lock_gone(None, at(1600));
        assert!(matches!(t.state(), LockState::Waiting { .. }));
    }

    #[test]
    fn adopted_request_holds_only_after_own_renewal() {
        let mut t = Tracker::new("db-abcde", "u1", None, None);
        t.on_request(&request("db-abcde", "u1", granted(9, "10s")), at(5000));
        assert!(matches!(t.state(), LockState::Waiting { .. }), "no base yet: must not hold");
        t.on_write_ok(at(5100), at(5200), None);
        assert!(matches!(t.state(), LockState::Holding { token: 9, deadline, .. } if *deadline == at(14_100)));
    }

    #[test]
    fn position_while_waiting_and_renew_interval_from_lock() {
        let mut t = new_tracker();
        let mut l = lock("L", 2, &[("a", "ua", 2)]);
        l.status.as_mut().unwrap().queue = vec!["x".into(), "db-abcde".into()];
        t.on_lock(&l, at(1100));
        assert_eq!(t.state(), &LockState::Waiting { position: Some(1) });
        assert_eq!(t.renew_interval(), 10 * S); // Lock lease 30s
        let st = LockRequestStatus { phase: Some(Phase::Pending), position: Some(0), ..Default::default() };
        t.on_request(&request("db-abcde", "u1", Some(st)), at(1200));
        assert_eq!(t.state(), &LockState::Waiting { position: Some(0) });
    }

    #[test]
    fn released_is_final() {
        let mut t = new_tracker();
        t.on_request(&request("db-abcde", "u1", granted(2, "10s")), at(2000));
        t.on_released();
        assert_eq!(t.state(), &LockState::Lost { reason: LostReason::Released, token: Some(2) });
        t.on_tick(at(100_000));
        assert_eq!(t.state(), &LockState::Lost { reason: LostReason::Released, token: Some(2) });
    }

    proptest::proptest! {
        /// Whatever the order of renewals and answers, the tracker never claims to hold at a
        /// time later than (the latest send time of a write answered before the deadline) +
        /// lease − margin, and once lost stays lost.
        #[test]
        fn never_holds_past_a_valid_deadline(events in proptest::collection::vec((0u64..3000, 0u64..3000, proptest::bool::ANY), 1..40)) {
            let lease = 10 * S;
            let margin = default_margin(lease);
            let mut t = Tracker::new("r", "u", None, None);
            t.on_write_ok(at(0), at(1), None);
            t.on_request(&request("r", "u", granted(1, "10s")), at(2));
            let mut now = 2u64;
            let mut best_valid_send = 0u64;
            let mut was_lost = false;
            for (advance, latency, is_write) in events {
                now += advance * 5;
                if is_write {
                    let sent = now.saturating_sub(latency * 5);
                    let was_holding = t.state().is_holding_at(at(now));
                    t.on_write_ok(at(sent), at(now), None);
                    if was_holding { best_valid_send = best_valid_send.max(sent); }
                } else {
                    t.on_tick(at(now));
                }
                if was_lost { proptest::prop_assert!(t.state().is_lost()); }
                was_lost = t.state().is_lost();
                if let Some(d) = t.deadline() {
                    proptest::prop_assert!(d <= deadline(at(best_valid_send), lease, margin));
                    proptest::prop_assert!(at(now) < d);
                }
            }
        }
    }
}
