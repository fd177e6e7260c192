//! Logs and metrics: tracing setup, the Prometheus registry, and the admin HTTP server
//! (`/metrics`, `/healthz`, `/readyz`).

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// How log lines are written.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (for log collectors).
    Json,
}

/// The log filter could not be parsed.
#[derive(Debug, thiserror::Error)]
#[error("invalid log filter {filter:?}: {source}")]
pub struct LogFilterError {
    filter: String,
    #[source]
    source: tracing_subscriber::filter::ParseError,
}

/// Installs the global subscriber: logs go to stderr, so that stdout stays for command output.
pub fn init_tracing(filter: &str, format: LogFormat) -> Result<(), LogFilterError> {
    let env_filter = EnvFilter::try_new(filter)
        .map_err(|source| LogFilterError { filter: filter.to_string(), source })?;
    let registry = tracing_subscriber::registry().with(env_filter);
    let _ = match format {
        LogFormat::Text => registry.with(fmt::layer().with_writer(std::io::stderr).with_target(false)).try_init(),
        LogFormat::Json => registry.with(fmt::layer().json().with_writer(std::io::stderr)).try_init(),
    };
    Ok(())
}
