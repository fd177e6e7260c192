//! When the work done under a grant must be told to stop, so that it has stopped by the
//! holder's local deadline: the successor may be granted from the deadline + margin on.
//!
//! A holder renews every lease/3; in steady state its deadline is at least
//! `lease − margin − lease/3` ahead. The work is told to stop at `deadline − grace` (when
//! that passes, renewals have failed for a while) and is killed at the deadline. A grace
//! longer than that steady-state headroom would stop healthy work: it is refused.

use std::time::Duration;

use super::clock::BootInstant;

/// The longest grace that fits a lease: from the moment a renewal is due to the deadline.
pub fn max_grace(lease: Duration, margin: Duration) -> Duration {
    lease.saturating_sub(margin).saturating_sub(lease / 3)
}

/// The grace used when none is given: half of what fits, at most 10 s.
pub fn default_grace(lease: Duration, margin: Duration) -> Duration {
    (max_grace(lease, margin) / 2).min(Duration::from_secs(10))
}

/// `grace` if it fits the lease, else why not (naming the figures).
pub fn check_grace(grace: Duration, lease: Duration, margin: Duration) -> Result<Duration, String> {
    let max = max_grace(lease, margin);
    if grace >= max {
        return Err(format!(
            "{} does not fit the lease {}: the work must have stopped by the local deadline, and \
             must not be stopped while renewals succeed (they come every lease/3), so it must be \
             shorter than lease − margin − lease/3 = {}",
            crate::api::duration::format(grace),
            crate::api::duration::format(lease),
            crate::api::duration::format(max),
        ));
    }
    Ok(grace)
}

/// When to tell the work to stop: `grace` before the deadline.
pub fn stop_at(deadline: BootInstant, grace: Duration) -> BootInstant {
    deadline.saturating_sub(grace)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::default_margin;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn the_grace_fits_between_a_due_renewal_and_the_deadline() {
        let lease = 30 * S;
        let margin = default_margin(lease); // 3 s
        assert_eq!(max_grace(lease, margin), 17 * S);
        assert_eq!(default_grace(lease, margin), Duration::from_millis(8500));
        assert!(check_grace(10 * S, lease, margin).is_ok());
        let e = check_grace(17 * S, lease, margin).unwrap_err();
        assert!(e.contains("17s") && e.contains("30s"), "{e}");
        // A short lease leaves little: 3 s − 300 ms − 1 s.
        let lease = 3 * S;
        assert_eq!(max_grace(lease, default_margin(lease)), Duration::from_millis(1700));
        assert!(check_grace(2 * S, lease, default_margin(lease)).is_err());
        assert_eq!(default_grace(60 * S, default_margin(60 * S)), 10 * S, "at most 10 s");
        let deadline = BootInstant::from_since_boot(100 * S);
        assert_eq!(stop_at(deadline, 10 * S), BootInstant::from_since_boot(90 * S));
    }
}
