//! The command-line tools: `run`, `acquire`, `release`, `status`, `list`, `break`.
//! (Placeholder: filled in by the client-side work.)

use std::process::ExitCode;

use crate::connect::ClientArgs;

/// Errors of the CLI commands.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("not implemented yet")]
    NotImplemented,
}

macro_rules! placeholder {
    ($($args:ident => $func:ident),* $(,)?) => {$(
        #[derive(clap::Args, Debug)]
        pub struct $args {}
        pub async fn $func(_args: $args, _client: &ClientArgs) -> Result<ExitCode, CliError> {
            Err(CliError::NotImplemented)
        }
    )*};
}

placeholder!(RunArgs => run, AcquireArgs => acquire, ReleaseArgs => release, StatusArgs => status, ListArgs => list, BreakArgs => break_lock);
