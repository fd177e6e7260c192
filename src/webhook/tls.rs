//! The webhook's serving certificate: read from files (`tls.crt`, `tls.key`, as a Secret
//! mounts them) and reloaded when they change (cert-manager or the chart rotate them), or
//! generated with a CA of its own for a local control plane.

use std::{
    io,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use axum_server::tls_rustls::RustlsConfig;

/// How often the certificate files are checked for a change.
const RELOAD_EVERY: Duration = Duration::from_secs(10);

/// File names in the certificate directory.
pub const CERT_FILE: &str = "tls.crt";
/// See [`CERT_FILE`].
pub const KEY_FILE: &str = "tls.key";
/// The CA that signed a generated certificate (the webhook configurations' `caBundle`).
pub const CA_FILE: &str = "ca.crt";

/// Generates a CA and a serving certificate for `names` (DNS names or IP addresses) into
/// `dir`: `ca.crt`, `tls.crt`, `tls.key`. Returns the CA's PEM.
pub fn generate(dir: &Path, names: &[String]) -> Result<String, TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "kubelock webhook CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca_key = KeyPair::generate()?;
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let mut params = CertificateParams::new(names.to_vec())?;
    params.distinguished_name.push(DnType::CommonName, names.first().map_or("kubelock-webhook", String::as_str));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    std::fs::create_dir_all(dir).map_err(|e| TlsError::Io(dir.to_path_buf(), e))?;
    for (name, pem) in [(CA_FILE, ca.pem()), (CERT_FILE, cert.pem()), (KEY_FILE, key.serialize_pem())] {
        let path = dir.join(name);
        std::fs::write(&path, pem).map_err(|e| TlsError::Io(path, e))?;
    }
    Ok(ca.pem())
}

/// Why the certificate could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {source}", path = .0.display(), source = .1)]
    Io(PathBuf, #[source] io::Error),
}

fn modified(dir: &Path) -> Option<(SystemTime, SystemTime)> {
    let m = |f: &str| std::fs::metadata(dir.join(f)).and_then(|m| m.modified()).ok();
    Some((m(CERT_FILE)?, m(KEY_FILE)?))
}

/// Loads the certificate and key of `dir`, and keeps reloading them when they change.
pub async fn serving_config(dir: &Path) -> Result<RustlsConfig, TlsError> {
    // One process-wide crypto provider for rustls (the one kube's client uses too).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (cert, key) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
    let config = RustlsConfig::from_pem_file(&cert, &key).await.map_err(|e| TlsError::Io(cert.clone(), e))?;
    let reload = config.clone();
    let dir = dir.to_path_buf();
    tokio::spawn(async move {
        let mut seen = modified(&dir);
        loop {
            tokio::time::sleep(RELOAD_EVERY).await; // polling the files: no event says they changed
            let now = modified(&dir);
            if now != seen {
                match reload.reload_from_pem_file(dir.join(CERT_FILE), dir.join(KEY_FILE)).await {
                    Ok(()) => {
                        tracing::info!(dir = %dir.display(), "serving certificate reloaded");
                        seen = now;
                    }
                    Err(e) => tracing::warn!(error = %e, "reloading the serving certificate (keeping the old one)"),
                }
            }
        }
    });
    Ok(config)
}
