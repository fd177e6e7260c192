//! Connection flags shared by every subcommand (`--kubeconfig`, `--context`, `-n`) and the
//! one place that turns them into a [`kube::Client`].

use std::{path::PathBuf, time::Duration};

use kube::config::{KubeConfigOptions, Kubeconfig};

/// How to reach the cluster. Same names and meaning as kubectl's flags, so that
/// `kubectl lock ...` (the plugin) honours what kubectl was given.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ClientArgs {
    /// Path to a kubeconfig file (default: $KUBECONFIG, ~/.kube/config, then in-cluster).
    #[arg(long, global = true, env = "KUBECONFIG", value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// Namespace (default: the context's namespace, or `default`).
    #[arg(short = 'n', long, global = true, value_name = "NS")]
    pub namespace: Option<String>,
    /// Timeout of every single API request.
    #[arg(long, global = true, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub request_timeout: Duration,
}

/// Why no client could be built.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("loading cluster configuration: {0}")]
    Infer(#[source] kube::config::InferConfigError),
    #[error("building kubeconfig client configuration: {0}")]
    Config(#[source] kube::config::KubeconfigError),
    #[error("creating the API client: {0}")]
    Client(#[source] kube::Error),
}

impl ClientArgs {
    /// The client configuration these flags select.
    pub async fn config(&self) -> Result<kube::Config, ConnectError> {
        let options = KubeConfigOptions { context: self.context.clone(), ..Default::default() };
        let mut config = match &self.kubeconfig {
            Some(path) if !path.as_os_str().is_empty() => {
                let kc = Kubeconfig::read_from(path)
                    .map_err(|source| ConnectError::Kubeconfig { path: path.clone(), source })?;
                kube::Config::from_custom_kubeconfig(kc, &options).await.map_err(ConnectError::Config)?
            }
            _ if self.context.is_some() => {
                kube::Config::from_kubeconfig(&options).await.map_err(ConnectError::Config)?
            }
            _ => kube::Config::infer().await.map_err(ConnectError::Infer)?,
        };
        if let Some(ns) = &self.namespace {
            config.default_namespace = ns.clone();
        }
        // No read timeout on the client: watches are long reads. Callers bound each
        // request with `tokio::time::timeout` (see `request_timeout`).
        config.write_timeout = Some(self.request_timeout);
        config.connect_timeout = Some(self.request_timeout);
        Ok(config)
    }

    /// A client for these flags, and the namespace to work in.
    pub async fn client(&self) -> Result<(kube::Client, String), ConnectError> {
        let config = self.config().await?;
        let ns = config.default_namespace.clone();
        Ok((client_from_config(config)?, ns))
    }
}

/// Builds a [`kube::Client`] whose connections set `TCP_NODELAY`.
///
/// kube's default client leaves Nagle's algorithm on. A TLS request is written in more
/// than one segment, so the second waits for the server's delayed ACK: measured here, that
/// added ~25 ms to every API write and made a lock handover 5× slower than it needs to be.
pub fn client_from_config(config: kube::Config) -> Result<kube::Client, ConnectError> {
    use hyper_util::{
        client::legacy::{Client as HyperClient, connect::HttpConnector},
        rt::TokioExecutor,
    };
    use kube::client::ConfigExt as _;
    use tower::{BoxError, ServiceBuilder};

    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(config.connect_timeout);
    let https = config.rustls_https_connector_with_connector(http).map_err(ConnectError::Client)?;
    let hyper: HyperClient<_, kube::client::Body> = HyperClient::builder(TokioExecutor::new()).build(https);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer().map_err(ConnectError::Client)?)
        .layer(config.extra_headers_layer().map_err(ConnectError::Client)?)
        .map_err(BoxError::from)
        .service(hyper);
    Ok(kube::Client::new(service, config.default_namespace))
}

/// clap value parser for Go-style durations (`500ms`, `30s`, `5m`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    crate::api::duration::parse(text).map_err(|e| e.to_string())
}
