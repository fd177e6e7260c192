//! The command-line tools: `run` (a supervisor of the command it runs under the lock),
//! the admin commands `acquire`, `release`, `status`, `list`, `break`, and their tables.
//! All of them go through [`crate::client`]. Invoked as `kubectl-lock` the binary is the
//! `kubectl lock` plugin and honours kubectl's `--kubeconfig`, `--context`, `-n`.
//!
//! Exit codes of `kubelock run` (and `acquire --wait`), defined in [`crate::tools`]:
//! - the command's own exit code when it exits by itself while the lock is held;
//! - 128+N when the command died from signal N (as shells report it);
//! - [`EXIT_LOST`] (75) when the lock was lost while the command ran (the command is sent
//!   SIGTERM, then SIGKILL after `--grace`);
//! - [`EXIT_WAIT_TIMEOUT`] (76) when `--wait-timeout` passed before the grant;
//! - [`EXIT_REJECTED`] (77) when the controller rejected the request (more permits than the Lock has);
//! - 126/127 when the command cannot be executed / is not found (checked before acquiring);
//! - 130/143 when interrupted (SIGINT/SIGTERM) while waiting for the lock;
//! - 2 for invalid flags, 1 for other errors (API server unreachable, RBAC...).

mod admin;
mod run;
mod table;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use serde::Serialize;

pub use self::{
    admin::{AcquireArgs, BreakArgs, ListArgs, ReleaseArgs, StatusArgs, acquire, break_lock, list, release, status},
    run::{ProcessGroup, RunArgs, run},
};
pub use crate::tools::{EXIT_CANNOT_EXECUTE, EXIT_LOST, EXIT_NOT_FOUND, EXIT_REJECTED, EXIT_USAGE, EXIT_WAIT_TIMEOUT};
use crate::{
    client::{AcquireError, AcquireOptions, ClientError},
    connect::{ConnectError, parse_duration},
    pod::PodIdentity,
};

/// Errors of the CLI commands (exit code 1; the specific codes above are returned as values).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Acquire(#[from] AcquireError),
    #[error("{0}")]
    Usage(String),
    #[error("{what} {name} not found in namespace {namespace}")]
    NotFound { what: &'static str, name: String, namespace: String },
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("installing signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error("encoding output: {0}")]
    Output(String),
}

/// Output format of the read commands.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Output {
    /// Human-readable tables.
    #[default]
    Table,
    /// JSON.
    Json,
    /// YAML.
    Yaml,
}

/// Flags shared by `run` and `acquire`.
#[derive(clap::Args, Debug, Clone)]
pub struct RequestFlags {
    /// Permits to ask for (1 = mutex/reader; the Lock's permits = writer).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..))]
    pub permits: i32,
    /// Lease to ask for (default: the Lock's leaseDuration; capped at it).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub lease: Option<Duration>,
    /// Give up waiting for the grant after this long (default: wait forever).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub wait_timeout: Option<Duration>,
    /// Safety margin taken off the lease for the local deadline (default max(lease/10, 200ms)).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub margin: Option<Duration>,
    /// Holder identity shown in the Lock's status (default: `pod/NS/NAME` with POD_NAME set,
    /// else `HOSTNAME:PID`).
    #[arg(long, value_name = "TEXT")]
    pub holder: Option<String>,
}

impl RequestFlags {
    pub(crate) fn options(&self, lock: &str, namespace: &str) -> AcquireOptions {
        let pod = PodIdentity::from_env();
        let mut o = AcquireOptions::new(lock);
        o.permits = self.permits;
        o.lease = self.lease;
        o.wait_timeout = self.wait_timeout;
        o.margin = self.margin;
        o.pod_ref = pod.as_ref().and_then(|p| p.pod_ref_in(namespace));
        o.holder_identity =
            self.holder.clone().or_else(|| pod.map(|p| p.holder_identity(namespace))).unwrap_or_default();
        o
    }
}

pub(crate) fn usage(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("kubelock: {message}");
    ExitCode::from(EXIT_USAGE)
}

/// One API call bounded by the request timeout.
pub(crate) async fn timed<T>(
    timeout: Duration,
    op: &'static str,
    fut: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, ClientError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(ClientError::Api { op, source }),
        Err(_) => Err(ClientError::Timeout { op, after: timeout }),
    }
}

pub(crate) fn print_output<T: Serialize>(
    value: &T,
    output: Output,
    table: impl FnOnce() -> String,
) -> Result<(), CliError> {
    match output {
        Output::Table => print!("{}", table()),
        Output::Json => {
            let s = serde_json::to_string_pretty(value).map_err(|e| CliError::Output(e.to_string()))?;
            println!("{s}");
        }
        Output::Yaml => {
            let s = serde_yaml::to_string(value).map_err(|e| CliError::Output(e.to_string()))?;
            print!("{s}");
        }
    }
    Ok(())
}
