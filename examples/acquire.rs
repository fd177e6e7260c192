//! Acquire a kubelock Lock from Rust, use its fencing token, release it.
//!
//! ```sh
//! kubectl apply -f - <<'YAML'
//! apiVersion: kubelock.dev/v1alpha1
//! kind: Lock
//! metadata: {name: db-migrations}
//! spec: {leaseDuration: 15s}
//! YAML
//! cargo run --example acquire -- db-migrations
//! ```
//!
//! The guard renews the request every lease/3 in the background. Check `is_holding()` (or
//! race your work against `lost()`) before each side effect, and send the token with every
//! write so that the resource can refuse a holder that lost the lock (fencing).

use std::time::Duration;

use kubelock::client::{AcquireOptions, LockClient};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let lock = std::env::args().nth(1).unwrap_or_else(|| "db-migrations".into());
    let client = kube::Client::try_default().await?;
    let namespace = client.default_namespace().to_string();
    let locks = LockClient::new(client, namespace);

    let mut options = AcquireOptions::new(&lock);
    options.wait_timeout = Some(Duration::from_secs(60));
    let guard = locks.acquire(options).await?;
    println!("holding {lock} with fencing token {} (lock UID {})", guard.token(), guard.lock_uid());

    // The work: three steps, each fenced, each abandoned the moment the lock is lost.
    for step in 1..=3 {
        tokio::select! {
            reason = guard.lost() => {
                eprintln!("lost the lock before step {step}: {reason}");
                return Err(reason.to_string().into());
            }
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                // e.g. UPDATE ... WHERE fencing_token <= $token, or a conditional PUT.
                println!("step {step} done under token {} ({:?} left)", guard.token(), guard.time_left());
            }
        }
    }

    guard.release().await?;
    println!("released {lock}");
    Ok(())
}
