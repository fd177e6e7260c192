//! The holder's clock: `CLOCK_BOOTTIME`, which keeps counting while the machine is
//! suspended (Rust's `Instant` and tokio's timers use `CLOCK_MONOTONIC`, which stops), and a
//! timer on that clock (a `timerfd`) that wakes the task the moment a deadline passes, also
//! right after the process is thawed from SIGSTOP or the machine resumes.

use std::{io, os::fd::OwnedFd, time::Duration};

use rustix::time::{
    ClockId, Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec, clock_gettime, timerfd_create,
    timerfd_settime,
};
use tokio::io::{Interest, unix::AsyncFd};

/// A reading of `CLOCK_BOOTTIME`: time since boot, suspend included. Only differences of
/// two readings on the same machine mean anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BootInstant(Duration);

impl BootInstant {
    /// Reads `CLOCK_BOOTTIME` now.
    pub fn now() -> Self {
        let ts = clock_gettime(ClockId::Boottime);
        // The kernel never returns a negative boot time.
        Self(Duration::new(ts.tv_sec.max(0) as u64, ts.tv_nsec.clamp(0, 999_999_999) as u32))
    }

    /// The instant `since_boot` after boot (tests build instants this way).
    pub const fn from_since_boot(since_boot: Duration) -> Self {
        Self(since_boot)
    }

    /// Time since boot.
    pub const fn since_boot(self) -> Duration {
        self.0
    }

    /// `self + d`, saturating.
    pub fn saturating_add(self, d: Duration) -> Self {
        Self(self.0.saturating_add(d))
    }

    /// `self - d`, saturating at boot.
    pub fn saturating_sub(self, d: Duration) -> Self {
        Self(self.0.saturating_sub(d))
    }

    /// How long from `earlier` to `self` (zero if `earlier` is later).
    pub fn saturating_since(self, earlier: BootInstant) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

/// A one-shot timer on `CLOCK_BOOTTIME` (a `timerfd` armed with an absolute time), usable
/// from async code. Because it is armed with an absolute boot time, the kernel fires it as
/// soon as that time is reached, whatever happened in between (suspend, SIGSTOP, a starved
/// runtime); the process sees it the moment it runs again.
#[derive(Debug)]
pub struct BootTimer {
    fd: AsyncFd<OwnedFd>,
    armed: Option<BootInstant>,
}

impl BootTimer {
    /// Creates a disarmed timer. Needs a tokio runtime with IO enabled.
    pub fn new() -> io::Result<Self> {
        let fd = timerfd_create(TimerfdClockId::Boottime, TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC)?;
        // `with_interest` is deprecated in favour of an `unsafe` `register_with_interest`
        // (tokio#8587: a registered fd that its owner closes or replaces). Here the
        // `OwnedFd` is moved into the `AsyncFd`, which deregisters it before dropping it,
        // and nothing else can reach it: the concern does not arise, and this crate forbids
        // `unsafe`.
        #[allow(deprecated)]
        let fd = AsyncFd::with_interest(fd, Interest::READABLE)?;
        Ok(Self { fd, armed: None })
    }

    /// Arms the timer for `at` (replacing any earlier setting), or disarms it with `None`.
    /// A time already past fires at once.
    pub fn set(&mut self, at: Option<BootInstant>) -> io::Result<()> {
        if self.armed == at {
            return Ok(());
        }
        // A zero it_value disarms; a deadline at boot time zero cannot occur in practice, but
        // keep the value non-zero so that a past deadline still fires.
        let value = match at {
            Some(t) => {
                let d = t.since_boot().max(Duration::from_nanos(1));
                Timespec { tv_sec: d.as_secs() as i64, tv_nsec: i64::from(d.subsec_nanos()) }
            }
            None => Timespec { tv_sec: 0, tv_nsec: 0 },
        };
        let spec = Itimerspec { it_interval: Timespec { tv_sec: 0, tv_nsec: 0 }, it_value: value };
        timerfd_settime(self.fd.get_ref(), TimerfdTimerFlags::ABSTIME, &spec)?;
        self.armed = at;
        Ok(())
    }

    /// The time the timer is armed for.
    pub fn armed(&self) -> Option<BootInstant> {
        self.armed
    }

    /// Completes once the armed time has been reached (never while disarmed). Cancel-safe.
    pub async fn fired(&self) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut buf = [0u8; 8];
            match guard.try_io(|fd| rustix::io::read(fd.get_ref(), &mut buf).map_err(io::Error::from)) {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boottime_advances() {
        let a = BootInstant::now();
        let b = BootInstant::now();
        assert!(b >= a);
        assert!(a.since_boot() > Duration::ZERO);
    }

    #[test]
    fn arithmetic_saturates() {
        let t = BootInstant::from_since_boot(Duration::from_secs(5));
        assert_eq!(t.saturating_sub(Duration::from_secs(10)).since_boot(), Duration::ZERO);
        assert_eq!(t.saturating_add(Duration::from_secs(1)).saturating_since(t), Duration::from_secs(1));
        assert_eq!(t.saturating_since(t.saturating_add(Duration::from_secs(1))), Duration::ZERO);
    }

    #[tokio::test]
    async fn timer_fires_at_the_boottime_deadline_and_not_before() {
        let mut timer = BootTimer::new().unwrap();
        let start = BootInstant::now();
        let at = start.saturating_add(Duration::from_millis(80));
        timer.set(Some(at)).unwrap();
        tokio::time::timeout(Duration::from_secs(5), timer.fired()).await.expect("timer fired").unwrap();
        assert!(BootInstant::now() >= at, "fired early");
    }

    #[tokio::test]
    async fn past_deadline_fires_at_once_and_rearming_works() {
        let mut timer = BootTimer::new().unwrap();
        timer.set(Some(BootInstant::now().saturating_sub(Duration::from_secs(1)))).unwrap();
        tokio::time::timeout(Duration::from_secs(1), timer.fired()).await.expect("fired at once").unwrap();
        timer.set(Some(BootInstant::now().saturating_add(Duration::from_secs(3600)))).unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(50), timer.fired()).await.is_err(), "fired early");
        timer.set(Some(BootInstant::now())).unwrap();
        tokio::time::timeout(Duration::from_secs(1), timer.fired()).await.expect("fired after re-arm").unwrap();
        timer.set(None).unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(50), timer.fired()).await.is_err(), "fired disarmed");
    }
}
