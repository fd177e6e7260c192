//! `kubelock dev`: a local control plane (with `--node`, also a local node where pods run and
//! the images of `make image`), the CRDs and the controller in one command.

use std::{
    io::{self, Write as _},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use super::{ControlPlane, ControlPlaneOptions, DevError, IMAGE_FILES, Identity, install_crds, io_err};
use crate::{
    connect::ClientArgs,
    controller::{self, ControllerArgs},
    webhook::{self, WebhookArgs},
};

/// `kubelock dev` flags.
#[derive(clap::Args, Debug)]
pub struct DevArgs {
    /// Use the cluster selected by --kubeconfig / $KUBECONFIG / --context instead of starting a
    /// local control plane (CRDs are installed there and the controller runs here).
    #[arg(long)]
    pub use_cluster: bool,
    /// Keep etcd's data on disk instead of tmpfs (slower; what benchmarks measure).
    #[arg(long)]
    pub etcd_on_disk: bool,
    /// Keep the state directory (kubeconfigs, logs) after exiting.
    #[arg(long)]
    pub keep: bool,
    /// How long to wait for the local API server to become ready.
    #[arg(long, default_value = "90s", value_parser = crate::connect::parse_duration, value_name = "DURATION")]
    pub ready_timeout: Duration,
    /// Also run a local node (containerd, kubelet, kube-controller-manager, kube-scheduler,
    /// kube-proxy) so that pods run, and load the images of `make image` into it. Needs root;
    /// one per machine.
    #[arg(long, conflicts_with = "use_cluster")]
    pub node: bool,
    /// With --node: where `make image` wrote the image tarballs (kubelock.oci.tar, kubelock-test.oci.tar).
    #[arg(long, default_value = "target/image", value_name = "DIR", requires = "node")]
    pub images: PathBuf,
    /// With --node: load no images (only the pause image the node needs).
    #[arg(long, requires = "node", conflicts_with = "images")]
    pub no_images: bool,
    /// Do not run the admission webhook (who may touch a request, the fence of objects
    /// labelled `kubelock.dev/fenced-by`). The local control plane runs it by default, so
    /// that it enforces what an installed cluster does.
    #[arg(long)]
    pub no_webhook: bool,
    #[command(flatten)]
    pub controller: ControllerArgs,
}

/// Runs `kubelock dev` until SIGINT/SIGTERM, then stops everything it started.
pub async fn run_dev(args: DevArgs, client_args: &ClientArgs) -> Result<ExitCode, DevError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut sigterm = signal(SignalKind::terminate()).map_err(io_err("installing the SIGTERM handler"))?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(io_err("installing the SIGINT handler"))?;

    let setup = async {
        if args.use_cluster {
            let (client, _ns) = client_args.client().await?;
            Ok::<_, DevError>((client, None, false))
        } else {
            // The images are checked first: a missing one should not cost a node start.
            let images: Vec<PathBuf> = match args.node && !args.no_images {
                true => IMAGE_FILES.iter().map(|f| args.images.join(f)).collect(),
                false => Vec::new(),
            };
            if let Some(missing) = images.iter().find(|p| !p.is_file()) {
                return Err(DevError::ImageImport {
                    tar: missing.clone(),
                    stderr: "no such file: run `make image` first (or pass --images DIR, or --no-images)".into(),
                });
            }
            match args.node {
                true => eprintln!("kubelock dev: starting etcd, kube-apiserver and a local node (about 30 s)..."),
                false => eprintln!("kubelock dev: starting etcd and kube-apiserver (about 10 s)..."),
            }
            let opts = ControlPlaneOptions {
                etcd_on_disk: args.etcd_on_disk,
                keep_dir: args.keep,
                ready_timeout: args.ready_timeout,
                node: args.node,
                ..Default::default()
            };
            let cp = ControlPlane::start(opts).await?;
            for image in &images {
                cp.import_image(image).await?;
            }
            let client = cp.client(Identity::Admin).await?;
            Ok((client, Some(cp), !images.is_empty()))
        }
    };
    let (client, cp, images_loaded) = tokio::select! {
        res = setup => res?,
        _ = sigint.recv() => return Ok(ExitCode::from(130)),
        _ = sigterm.recv() => return Ok(ExitCode::from(143)),
    };
    tokio::select! {
        res = install_crds(&client, Duration::from_secs(60)) => res?,
        _ = sigint.recv() => return Ok(ExitCode::from(130)),
        _ = sigterm.recv() => return Ok(ExitCode::from(143)),
    }

    // The webhook, on a loopback port its API server calls (it registers itself).
    let (webhook_stop, webhook_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut webhook = None;
    if let Some(cp) = cp.as_ref().filter(|_| !args.no_webhook) {
        let webhook_args = WebhookArgs::local(cp.dir().join("webhook"), "kubelock");
        let listener = webhook::bind(&webhook_args.listen)?;
        let serving = webhook::serve(client.clone(), webhook_args, listener, async move {
            let _ = webhook_stopped.await;
        });
        webhook = Some(tokio::spawn(serving));
        tokio::select! {
            res = webhook::config::wait_enforced(&client, "default", Duration::from_secs(30)) => {
                res.map_err(DevError::Webhook)?
            }
            _ = sigint.recv() => return Ok(ExitCode::from(130)),
            _ = sigterm.recv() => return Ok(ExitCode::from(143)),
        }
    }

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let timeout = client_args.request_timeout;
    let mut controller = tokio::spawn(controller::run_controller(client, args.controller, timeout, async move {
        let _ = stop_rx.await;
    }));

    match &cp {
        Some(cp) => {
            if let Some(node) = cp.node() {
                eprintln!(
                    "kubelock dev: node {} Ready at {} (pods in {}; logs in {}){}",
                    node.name,
                    node.address,
                    node.pod_subnet,
                    cp.dir().display(),
                    match images_loaded {
                        true => format!(
                            "; images {} and {} loaded (imagePullPolicy: Never)",
                            super::IMAGE,
                            super::TEST_IMAGE
                        ),
                        false => String::new(),
                    },
                );
            }
            println!("export KUBECONFIG={}", cp.kubeconfig(Identity::Admin).display());
            eprintln!(
                "kubelock dev: control plane ready at {}; CRDs installed; controller{} running.\n\
                 kubelock dev: other identities: {}\n\
                 kubelock dev: try `kubectl get locks -A`. Ctrl-C stops everything.",
                cp.server(),
                if webhook.is_some() { " and admission webhook" } else { "" },
                Identity::ALL[1..]
                    .iter()
                    .map(|id| cp.kubeconfig(*id).display().to_string())
                    .collect::<Vec<_>>()
                    .join(" "),
            );
        }
        None => {
            eprintln!("kubelock dev: CRDs installed; controller running against the given cluster. Ctrl-C stops it.")
        }
    }
    let _ = io::stdout().flush();

    // Run until a signal, the controller ends, or a server dies.
    let mut health = tokio::time::interval(Duration::from_secs(1));
    let outcome: Result<ExitCode, DevError> = loop {
        tokio::select! {
            _ = sigint.recv() => break Ok(ExitCode::SUCCESS),
            _ = sigterm.recv() => break Ok(ExitCode::SUCCESS),
            res = &mut controller => {
                return match res {
                    Ok(Ok(())) => Ok(ExitCode::SUCCESS),
                    Ok(Err(e)) => Err(e.into()),
                    Err(e) => Err(DevError::ControllerTask(e)),
                };
            }
            _ = health.tick() => {
                if let Some(cp) = &cp
                    && let Err(e) = cp.check()
                {
                    break Err(e);
                }
            }
        }
    };
    eprintln!("kubelock dev: stopping");
    let _ = stop_tx.send(());
    match tokio::time::timeout(Duration::from_secs(10), &mut controller).await {
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "controller stopped with an error"),
        Ok(Err(e)) => tracing::warn!(error = %e, "controller task failed"),
        Ok(Ok(Ok(()))) => {}
        Err(_) => {
            tracing::warn!("controller did not stop within 10s");
            controller.abort();
        }
    }
    let _ = webhook_stop.send(());
    if let Some(webhook) = webhook {
        match tokio::time::timeout(Duration::from_secs(10), webhook).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "webhook stopped with an error"),
            Ok(Err(e)) => tracing::warn!(error = %e, "webhook task failed"),
            Ok(Ok(Ok(()))) => {}
            Err(_) => tracing::warn!("webhook did not stop within 10s"),
        }
    }
    drop(cp);
    outcome
}
