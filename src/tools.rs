//! What the command-line tools (`run`, `acquire`, the sidecar) share: their exit codes and
//! the flag that sets each acquire option (so a validation error names the flag).

/// The lock was lost while the command ran.
pub const EXIT_LOST: u8 = 75;
/// `--wait-timeout` passed before the grant.
pub const EXIT_WAIT_TIMEOUT: u8 = 76;
/// The controller rejected the request (it can never be granted).
pub const EXIT_REJECTED: u8 = 77;
/// Invalid flags (same as clap's usage errors).
pub const EXIT_USAGE: u8 = 2;
/// The command was found but cannot be executed.
pub const EXIT_CANNOT_EXECUTE: u8 = 126;
/// The command was not found.
pub const EXIT_NOT_FOUND: u8 = 127;

/// The flag (or variable) behind an [`crate::client::AcquireOptions`] field named in a
/// validation error.
pub fn flag_of(field: &str) -> &'static str {
    match field {
        "lock" => "--lock (the lock name)",
        "permits" => "--permits",
        "lease" => "--lease",
        "margin" => "--margin",
        "holder identity" => "--holder",
        "pod name" => "POD_NAME",
        _ => "flags",
    }
}
