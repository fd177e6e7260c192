//! Leader election on a kubelock mutex: the holder is the leader. Unlike client-go's
//! Lease-polling election, waiters are woken by watch the moment the leader releases, every
//! term carries a fencing token, and the leader learns it lost the lock the moment its
//! local deadline (on `CLOCK_BOOTTIME`) passes, even with the API server unreachable.
//!
//! ```no_run
//! # async fn demo(client: kube::Client) {
//! use kubelock::client::{AcquireOptions, LeaderElector, Leadership, LockClient};
//! let elector = LeaderElector::new(LockClient::new(client, "default"), AcquireOptions::new("my-app-leader"));
//! let mut leadership = elector.subscribe();
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! tokio::spawn(elector.run(shutdown.clone()));
//! while leadership.changed().await.is_ok() {
//!     match &*leadership.borrow() {
//!         // Check `is_current()` right before acting: the term may have passed its deadline
//!         // since this value was published (a stalled consumer reads stale values).
//!         Leadership::Leading(term) if term.is_current() => println!("leading, token {}", term.token),
//!         _ => println!("standing by"),
//!     }
//! }
//! # }
//! ```

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{AcquireError, AcquireOptions, BootInstant, LockClient, LockState};

/// Whether this process leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leadership {
    /// Not leading (waiting for the lock, or between terms).
    NotLeading,
    /// Leading in this term (until its deadline: check [`Term::is_current`] before acting).
    Leading(Term),
}

impl Leadership {
    /// Leading now: in a term whose local deadline has not passed (checked on
    /// `CLOCK_BOOTTIME` at the call, so a value read late is not taken for leadership).
    pub fn is_leading(&self) -> bool {
        matches!(self, Leadership::Leading(term) if term.is_current())
    }
}

/// One term of leadership: one grant of the lock.
#[derive(Clone)]
pub struct Term {
    /// Fencing token of the term (new and larger for every term).
    pub token: i64,
    /// The Lock's UID.
    pub lock_uid: String,
    /// The LockRequest of the term.
    pub request: String,
    state: watch::Receiver<LockState>,
}

impl Term {
    /// Still leading: the grant holds and its local deadline has not passed, now.
    pub fn is_current(&self) -> bool {
        self.state.borrow().is_holding_at(BootInstant::now())
    }

    /// The term's local deadline (it moves on with each renewal); `None` once it is over.
    pub fn deadline(&self) -> Option<BootInstant> {
        match &*self.state.borrow() {
            LockState::Holding { deadline, .. } => Some(*deadline),
            _ => None,
        }
    }
}

impl PartialEq for Term {
    fn eq(&self, other: &Self) -> bool {
        (self.token, &self.lock_uid, &self.request) == (other.token, &other.lock_uid, &other.request)
    }
}

impl Eq for Term {}

impl std::fmt::Debug for Term {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Term")
            .field("token", &self.token)
            .field("request", &self.request)
            .field("current", &self.is_current())
            .finish()
    }
}

/// Runs for the lock until shut down; re-acquires with a new request after each loss.
pub struct LeaderElector {
    client: LockClient,
    opts: AcquireOptions,
    tx: watch::Sender<Leadership>,
}

/// Backoff after a failed acquire (API unreachable, lock rejected...).
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

impl LeaderElector {
    /// An elector for `opts.lock` (its permits should be the Lock's: 1 for a mutex).
    /// `opts.wait_timeout` and `opts.cancel` are ignored: it waits until shut down.
    pub fn new(client: LockClient, opts: AcquireOptions) -> Self {
        let (tx, _) = watch::channel(Leadership::NotLeading);
        Self { client, opts, tx }
    }

    /// Leadership changes.
    pub fn subscribe(&self) -> watch::Receiver<Leadership> {
        self.tx.subscribe()
    }

    /// Campaigns until `shutdown` fires, then releases (fire it once the app stopped acting as
    /// leader). A term lost otherwise is not released: it drains or expires. Returns an error
    /// only for options that can never succeed.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AcquireError> {
        self.opts.validate()?;
        let mut backoff = BACKOFF_MIN;
        loop {
            let mut opts = self.opts.clone();
            opts.wait_timeout = None;
            opts.cancel = Some(shutdown.child_token());
            match self.client.acquire(opts).await {
                Ok(guard) => {
                    backoff = BACKOFF_MIN;
                    self.tx.send_replace(Leadership::Leading(Term {
                        token: guard.token(),
                        lock_uid: guard.lock_uid().to_string(),
                        request: guard.request_name().to_string(),
                        state: guard.state(),
                    }));
                    let lost = tokio::select! {
                        reason = guard.lost() => {
                            self.tx.send_replace(Leadership::NotLeading);
                            warn!(lock = %self.opts.lock, token = guard.token(), %reason, "leadership lost");
                            true
                        }
                        _ = shutdown.cancelled() => {
                            self.tx.send_replace(Leadership::NotLeading);
                            false
                        }
                    };
                    let token = guard.token();
                    if lost {
                        // Not our release: the app may still act on the term until its local
                        // deadline (it checked `is_current` before an action now under way), so
                        // its permits drain (or expire) as the controller decides. The release
                        // mark would free them at once.
                        guard.detach();
                    } else if let Err(e) = guard.release().await {
                        warn!(lock = %self.opts.lock, token, error = %e, "releasing the lock request failed");
                    }
                    if shutdown.is_cancelled() {
                        info!(lock = %self.opts.lock, token, "stepped down");
                        return Ok(());
                    }
                }
                Err(AcquireError::Cancelled { .. }) => return Ok(()),
                Err(e @ AcquireError::Invalid { .. }) => return Err(e),
                Err(e) => {
                    warn!(lock = %self.opts.lock, error = %e, retry_in = ?backoff, "campaign failed");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => return Ok(()),
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_term_read_after_its_deadline_is_not_leadership() {
        let (tx, rx) = watch::channel(LockState::Holding {
            token: 7,
            lock_uid: "u".into(),
            lease: Duration::from_secs(10),
            deadline: BootInstant::now().saturating_add(Duration::from_secs(5)),
        });
        let leading = Leadership::Leading(Term { token: 7, lock_uid: "u".into(), request: "r".into(), state: rx });
        assert!(leading.is_leading());
        // The deadline passes before anyone publishes a new value: a stalled consumer that
        // reads the old one must not take it for leadership.
        tx.send_replace(LockState::Holding {
            token: 7,
            lock_uid: "u".into(),
            lease: Duration::from_secs(10),
            deadline: BootInstant::now().saturating_sub(Duration::from_millis(1)),
        });
        assert!(!leading.is_leading());
        let Leadership::Leading(term) = &leading else { unreachable!() };
        assert!(!term.is_current());
        assert!(term.deadline().is_some());
    }
}
