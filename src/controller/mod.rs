//! The controller: fetch -> plan -> compare-and-swap the Lock status -> mirror request statuses.

use std::process::ExitCode;

use crate::connect::ClientArgs;

/// `kubelock controller` flags.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ControllerArgs {}

/// Controller errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Connect(#[from] crate::connect::ConnectError),
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

/// Runs the controller until SIGINT/SIGTERM. For now: connects and reports the server version.
pub async fn run(_args: ControllerArgs, client: &ClientArgs) -> Result<ExitCode, Error> {
    let (client, _ns) = client.client().await?;
    let version = client.apiserver_version().await?;
    tracing::info!(version = %version.git_version, "connected to the API server");
    Ok(ExitCode::SUCCESS)
}
