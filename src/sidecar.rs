//! The pod sidecar. (Placeholder: filled in by the client-side work.)

use std::process::ExitCode;

use crate::connect::ClientArgs;

/// Sidecar flags.
#[derive(clap::Args, Debug)]
pub struct SidecarArgs {}

/// Sidecar errors.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("not implemented yet")]
    NotImplemented,
}

/// Runs the sidecar.
pub async fn run(_args: SidecarArgs, _client: &ClientArgs) -> Result<ExitCode, SidecarError> {
    Err(SidecarError::NotImplemented)
}
