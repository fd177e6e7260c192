//! The history checker: what the store committed, what the holders did and which faults were
//! injected, on one clock, judged against the safety and progress properties of kubelock's
//! design (docs/design.md).
//!
//! - [`recording`]: what is recorded: the store's history read from etcd ([`History`]), what the
//!   holders report and which faults were injected ([`Journal`]);
//! - [`properties`]: what is checked ([`check`]), property by property, and the bounds;
//! - [`timeline`]: the readable timeline around the first violations that a failed check
//!   carries ([`Failure`]).

use std::time::Duration;

mod properties;
mod recording;
mod timeline;

// The checker's interface, as before the split into modules; not every name is used.
#[allow(unused_imports)]
pub use properties::{Bounds, Failure, Summary, Violation, check};
#[allow(unused_imports)]
pub use recording::{
    Change, Fault, FaultKind, History, HolderEntry, Journal, LockVersion, Log, Record, Report, RequestVersion,
    lock_version,
};

/// A moment: `CLOCK_BOOTTIME` since boot. The same clock in every process of this machine.
pub type At = Duration;

/// Now, on `CLOCK_BOOTTIME`.
pub fn now() -> At {
    kubelock::client::BootInstant::now().since_boot()
}
