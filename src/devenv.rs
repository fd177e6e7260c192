//! The local control plane used by `kubelock dev` and the tests. (Placeholder.)

use std::process::ExitCode;

use crate::connect::ClientArgs;

/// `kubelock dev` flags.
#[derive(clap::Args, Debug)]
pub struct DevArgs {}

/// Dev environment errors.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("not implemented yet")]
    NotImplemented,
}

/// Runs `kubelock dev`.
pub async fn run_dev(_args: DevArgs, _client: &ClientArgs) -> Result<ExitCode, DevError> {
    Err(DevError::NotImplemented)
}
