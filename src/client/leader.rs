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
//!         Leadership::Leading { token, .. } => println!("leading, token {token}"),
//!         Leadership::NotLeading => println!("standing by"),
//!     }
//! }
//! # }
//! ```

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{AcquireError, AcquireOptions, LockClient};

/// Whether this process leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leadership {
    /// Not leading (waiting for the lock, or between terms).
    NotLeading,
    /// Leading with this fencing token (new and larger for every term).
    Leading {
        /// Fencing token of the term.
        token: i64,
        /// The Lock's UID.
        lock_uid: String,
        /// The LockRequest of the term.
        request: String,
    },
}

impl Leadership {
    /// Leading.
    pub fn is_leading(&self) -> bool {
        matches!(self, Leadership::Leading { .. })
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

    /// Campaigns until `shutdown` fires, then releases. Returns an error only for options
    /// that can never succeed.
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
                    self.tx.send_replace(Leadership::Leading {
                        token: guard.token(),
                        lock_uid: guard.lock_uid().to_string(),
                        request: guard.request_name().to_string(),
                    });
                    tokio::select! {
                        reason = guard.lost() => {
                            self.tx.send_replace(Leadership::NotLeading);
                            warn!(lock = %self.opts.lock, token = guard.token(), %reason, "leadership lost");
                        }
                        _ = shutdown.cancelled() => {
                            self.tx.send_replace(Leadership::NotLeading);
                        }
                    }
                    let token = guard.token();
                    if let Err(e) = guard.release().await {
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
