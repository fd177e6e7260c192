//! The admission webhook the tests run against: one `kubelock webhook` process per cluster,
//! on a loopback port with a certificate of its own CA, registered (`--register`) for the
//! namespaces labelled [`LABEL`] alone — those of [`TestEnv::with_webhook`](super::TestEnv) —
//! so that every other test sees the API server without it. The controller identity
//! (`kubelock-controller`) is its trusted user, as the chart trusts the controller's
//! ServiceAccount.

use std::{
    path::{Path, PathBuf},
    process::Child,
    time::Duration,
};

use kubelock::devenv::{guarded_command, log_tail, spawn_guarded};

use super::{Cluster, Identity, process::KUBELOCK};

/// The namespace label that opts a test's namespace into the webhook.
pub const LABEL: (&str, &str) = ("kubelock.dev/test-webhook", "enabled");

/// A running `kubelock webhook` (killed with the test binary, or when dropped).
pub struct Webhook {
    child: Child,
    /// Its directory: certificate (`ca.crt`, `tls.crt`, `tls.key`), address file, log.
    pub dir: PathBuf,
    /// `127.0.0.1:PORT`.
    pub address: String,
    log: PathBuf,
}

impl Webhook {
    /// Starts the webhook of `cluster` and waits until it serves and is registered.
    pub async fn start(cluster: &Cluster, dir: &Path) -> Result<Webhook, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let log = dir.join("webhook.log");
        let address_file = dir.join("address");
        let out = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = guarded_command(KUBELOCK);
        cmd.arg("webhook")
            .arg("--kubeconfig")
            .arg(cluster.kubeconfig(Identity::Admin))
            .args(["--listen", "127.0.0.1:0", "--generate-cert", "127.0.0.1"])
            .arg("--cert-dir")
            .arg(dir)
            .arg("--address-file")
            .arg(&address_file)
            .args(["--register", "kubelock-test"])
            .arg("--namespace-label")
            .arg(format!("{}={}", LABEL.0, LABEL.1))
            .arg("--trusted-user")
            .arg(Identity::Controller.user())
            .env("RUST_LOG", "info")
            .stdout(out)
            .stderr(err);
        let child = spawn_guarded(cmd).map_err(|e| format!("spawning kubelock webhook: {e}"))?;
        let mut webhook = Webhook { child, dir: dir.to_path_buf(), address: String::new(), log };
        // Polled: the address file appears once it listens (and registered itself).
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = webhook.child.try_wait() {
                return Err(format!("kubelock webhook exited ({status}); last lines:\n{}", webhook.log_tail(20)));
            }
            if let Ok(address) = std::fs::read_to_string(&address_file)
                && !address.trim().is_empty()
            {
                webhook.address = address.trim().to_string();
                break;
            }
            if std::time::Instant::now() >= deadline {
                return Err(format!("kubelock webhook not serving after 60s; last lines:\n{}", webhook.log_tail(20)));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(webhook)
    }

    /// The last lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// The PEM of the CA that signed its serving certificate.
    pub fn ca(&self) -> String {
        std::fs::read_to_string(self.dir.join("ca.crt")).unwrap_or_default()
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
