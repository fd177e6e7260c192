//! The controller: fetch -> plan -> compare-and-swap the Lock status -> mirror request statuses.

use std::{future::Future, net::SocketAddr, process::ExitCode, time::Duration};

use crate::connect::{ClientArgs, parse_duration};

/// `kubelock controller` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct ControllerArgs {
    /// Watch only this namespace (namespace-scoped install, Role instead of ClusterRole).
    /// Default: all namespaces.
    #[arg(long, env = "KUBELOCK_WATCH_NAMESPACE", value_name = "NS")]
    pub watch_namespace: Option<String>,
    /// Address of the admin server (/metrics, /healthz, /readyz). Empty to disable.
    #[arg(long, env = "KUBELOCK_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    pub admin_addr: String,
    /// Run only while holding the leader-election Lease (several replicas for availability).
    /// Safety never depends on it: grants are decided by compare-and-swap.
    #[arg(long, env = "KUBELOCK_LEADER_ELECT")]
    pub leader_elect: bool,
    /// Namespace of the leader-election Lease (default: $POD_NAMESPACE, else `default`).
    #[arg(long, env = "KUBELOCK_LEADER_ELECT_NAMESPACE")]
    pub leader_elect_namespace: Option<String>,
    /// Name of the leader-election Lease.
    #[arg(long, env = "KUBELOCK_LEADER_ELECT_LEASE", default_value = "kubelock-controller")]
    pub leader_elect_lease: String,
    /// How long Expired and Rejected LockRequests are kept before the controller deletes them.
    #[arg(long, env = "KUBELOCK_FINISHED_RETENTION", default_value = "15m", value_parser = parse_duration)]
    pub finished_retention: Duration,
    /// Watch the pods named by `spec.podRef` and release when they are gone.
    #[arg(long, env = "KUBELOCK_WATCH_PODS", default_value_t = true, action = clap::ArgAction::Set)]
    pub watch_pods: bool,
    /// Publish Kubernetes Events (Granted, Released, Expired, Rejected, Broken).
    #[arg(long, env = "KUBELOCK_EVENTS", default_value_t = true, action = clap::ArgAction::Set)]
    pub events: bool,
    /// Reconciles running at once (different Locks; one Lock is never reconciled twice at once).
    #[arg(long, env = "KUBELOCK_CONCURRENCY", default_value_t = 16)]
    pub concurrency: u16,
}

impl Default for ControllerArgs {
    fn default() -> Self {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: ControllerArgs,
        }
        Wrapper::parse_from(["kubelock"]).args
    }
}

impl ControllerArgs {
    /// The admin address, if enabled.
    pub fn admin_socket(&self) -> Result<Option<SocketAddr>, Error> {
        if self.admin_addr.is_empty() {
            return Ok(None);
        }
        self.admin_addr
            .parse()
            .map(Some)
            .map_err(|_| Error::Config(format!("--admin-addr {:?} is not an address like 0.0.0.0:8080", self.admin_addr)))
    }
}

/// Controller errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Connect(#[from] crate::connect::ConnectError),
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("configuration: {0}")]
    Config(String),
}

/// `kubelock controller`: runs until SIGINT/SIGTERM.
pub async fn run(args: ControllerArgs, client: &ClientArgs) -> Result<ExitCode, Error> {
    let (client, _ns) = client.client().await?;
    run_controller(client, args, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(ExitCode::SUCCESS)
}

/// Runs the controller in this process until `shutdown` completes (used by `kubelock dev`).
/// For now: connects and reports the server version.
pub async fn run_controller(
    client: kube::Client,
    _args: ControllerArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let version = client.apiserver_version().await?;
    tracing::info!(version = %version.git_version, "connected to the API server");
    shutdown.await;
    Ok(())
}
