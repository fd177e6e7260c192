//! The `kubelock` binary: controller, sidecar, process wrapper, CLI and kubectl plugin in one.
//! Invoked as `kubectl-lock` it is the `kubectl lock` plugin.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
#[cfg(feature = "dev")]
use kubelock::devenv;
use kubelock::{cli, connect::ClientArgs, controller, sidecar, telemetry, webhook};

#[derive(Parser, Debug)]
#[command(name = "kubelock", version, about = "Kubernetes-native distributed locks: fenced, watch-driven, queue-fair")]
struct Cli {
    #[command(flatten)]
    client: ClientArgs,
    /// Log filter (tracing EnvFilter syntax), e.g. `info`, `kubelock=debug`.
    #[arg(long, global = true, env = "KUBELOCK_LOG", default_value = "info")]
    log: String,
    /// Log format.
    #[arg(long, global = true, env = "KUBELOCK_LOG_FORMAT", value_enum, default_value_t = telemetry::LogFormat::Text)]
    log_format: telemetry::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the controller that grants locks (in-cluster, or against KUBECONFIG).
    Controller(controller::ControllerArgs),
    /// Print the CustomResourceDefinitions as YAML.
    Crd,
    /// Serve the admission webhooks: who may touch a request, what of it may change, bounds,
    /// and the fence of objects guarded by a Lock.
    Webhook(webhook::WebhookArgs),
    /// Start a local control plane (etcd + kube-apiserver), install the CRDs and run the controller.
    #[cfg(feature = "dev")]
    Dev(devenv::DevArgs),
    /// Acquire a lock, run a command while holding it, release when it exits.
    Run(cli::RunArgs),
    /// Hold a lock for the pod this runs in; serve /readyz while holding.
    Sidecar(sidecar::SidecarArgs),
    /// Create a LockRequest and (with --wait) wait until it is granted.
    Acquire(cli::AcquireArgs),
    /// Release your LockRequest once nothing acts on it (marked released, then deleted).
    Release(cli::ReleaseArgs),
    /// Show a lock: holders, tokens, queue.
    Status(cli::StatusArgs),
    /// List locks.
    List(cli::ListArgs),
    /// Force-release a lock's holder (administrators); recorded as an Event with who and why.
    Break(cli::BreakArgs),
}

fn main() -> ExitCode {
    let invoked_as = std::env::args_os()
        .next()
        .and_then(|a| std::path::Path::new(&a).file_name().map(|f| f.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let mut command = Cli::command();
    if invoked_as.starts_with("kubectl-lock") {
        command = command.bin_name("kubectl lock").name("kubectl lock");
    }
    let cli = match Cli::from_arg_matches(&command.get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if let Err(e) = telemetry::init_tracing(&cli.log, cli.log_format) {
        eprintln!("kubelock: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kubelock: starting the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kubelock: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let client = cli.client;
    Ok(match cli.command {
        Command::Crd => {
            print!("{}", kubelock::api::crds_yaml());
            ExitCode::SUCCESS
        }
        Command::Controller(args) => controller::run(args, &client).await.context("controller")?,
        Command::Webhook(args) => webhook::run(args, &client).await.context("webhook")?,
        #[cfg(feature = "dev")]
        Command::Dev(args) => devenv::run_dev(args, &client).await.context("dev")?,
        Command::Run(args) => cli::run(args, &client).await?,
        Command::Sidecar(args) => sidecar::run(args, &client).await.context("sidecar")?,
        Command::Acquire(args) => cli::acquire(args, &client).await?,
        Command::Release(args) => cli::release(args, &client).await?,
        Command::Status(args) => cli::status(args, &client).await?,
        Command::List(args) => cli::list(args, &client).await?,
        Command::Break(args) => cli::break_lock(args, &client).await?,
    })
}
