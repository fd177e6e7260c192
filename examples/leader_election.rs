//! Leader election on a kubelock mutex: run several copies, exactly one leads at a time,
//! each term with a larger fencing token. Stop the leader (Ctrl-C releases at once; SIGSTOP
//! makes it lose by lease) and watch another take over.
//!
//! ```sh
//! kubectl apply -f - <<'YAML'
//! apiVersion: kubelock.dev/v1alpha1
//! kind: Lock
//! metadata: {name: my-app-leader}
//! spec: {leaseDuration: 10s, lockDelay: 2s}
//! YAML
//! cargo run --example leader_election -- my-app-leader   # in two or three terminals
//! ```

use kubelock::client::{AcquireOptions, LeaderElector, Leadership, LockClient};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let lock = std::env::args().nth(1).unwrap_or_else(|| "my-app-leader".into());
    let client = kube::Client::try_default().await?;
    let namespace = client.default_namespace().to_string();

    let elector = LeaderElector::new(LockClient::new(client, namespace), AcquireOptions::new(&lock));
    let mut leadership = elector.subscribe();
    let shutdown = CancellationToken::new();
    let campaign = tokio::spawn(elector.run(shutdown.clone()));

    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            changed = leadership.changed() => {
                if changed.is_err() {
                    break;
                }
                match &*leadership.borrow_and_update() {
                    // Checked at the moment of acting: a term ends at its deadline even if no
                    // new value has been published yet.
                    Leadership::Leading(term) if term.is_current() => {
                        println!("leading (token {}): doing leader work", term.token)
                    }
                    _ => println!("not leading: standing by"),
                }
            }
        }
    }
    shutdown.cancel();
    campaign.await??; // steps down: deletes the request, the next candidate is granted at once
    println!("stepped down");
    Ok(())
}
