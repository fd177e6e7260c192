//! A shop's stock kept consistent by a Lock and the API server's fence: the stock and the
//! ledger of sales live in a ConfigMap labelled `kubelock.dev/fenced-by: <lock>`; buyers
//! read it, decide and write it back under the Lock, each write carrying their fencing
//! token (`Guard::fence`). With kubelock's admission webhook (`kubelock dev` runs it, the
//! chart installs it) the API server admits that write only while the token is a current
//! holder's: a buyer frozen past its lease (a GC pause, a stalled node) and thawed after its
//! successor sold is refused, so the stock is never oversold and no sale is lost.
//!
//! ```sh
//! kubectl apply -f - <<'YAML'
//! apiVersion: kubelock.dev/v1alpha1
//! kind: Lock
//! metadata: {name: shop}
//! spec: {leaseDuration: 3s}
//! YAML
//! cargo run --example inventory -- open --stock 10          # the fenced ConfigMap `shop`
//! cargo run --example inventory -- buy alice --count 3 --record sales.log
//! cargo run --example inventory -- buy frozen --freeze-after-read --record sales.log
//! kill -CONT <its pid>  # once another buyer sold: its stale write is refused
//! cargo run --example inventory -- audit --record sales.log
//! ```
//!
//! `open --no-fence` keeps the ConfigMap unlabelled: the same run then shows the lost update
//! (the thawed buyer's write overwrites a sale it never saw). `hack/demo.sh` runs both.
//!
//! The write is a merge patch without a resourceVersion, as many applications write: the
//! fence, not optimistic concurrency, is what refuses the stale writer here.

use std::{io::Write as _, path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};
use kubelock::{
    api::FENCING_TOKEN_ANNOTATION,
    client::{AcquireOptions, LockClient},
};

#[derive(Parser)]
struct Args {
    /// The Lock (and the ConfigMap of the stock, of the same name).
    #[arg(long, default_value = "shop")]
    lock: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the stock: `stock: N`, an empty ledger, fenced by the Lock.
    Open {
        #[arg(long, default_value_t = 10)]
        stock: i64,
        /// Leave the ConfigMap unlabelled: no fence.
        #[arg(long)]
        no_fence: bool,
    },
    /// Sell: acquire, read, write back one less and the sale id, release.
    Buy {
        /// The buyer's name (sale ids are NAME-1, NAME-2, ...).
        name: String,
        /// How many sales to try.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Stop this process (SIGSTOP) between reading and writing: it stops renewing, its
        /// lease passes, another buyer is granted. Send SIGCONT to thaw it; it then writes
        /// what it decided without checking its grant (the bug the fence catches).
        #[arg(long)]
        freeze_after_read: bool,
        /// Append the ids of the sales the API server accepted to this file.
        #[arg(long)]
        record: Option<PathBuf>,
    },
    /// Check the ledger against the stock and the buyers' records.
    Audit {
        /// The stock the shop opened with.
        #[arg(long, default_value_t = 10)]
        opened: i64,
        #[arg(long)]
        record: Option<PathBuf>,
    },
}

fn stock_of(cm: &ConfigMap) -> (i64, Vec<String>) {
    let data = cm.data.clone().unwrap_or_default();
    let stock = data.get("stock").and_then(|s| s.parse().ok()).unwrap_or(0);
    let sales = data.get("sales").map(|s| s.split(',').filter(|s| !s.is_empty()).map(String::from).collect());
    (stock, sales.unwrap_or_default())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let client = kube::Client::try_default().await?;
    let namespace = client.default_namespace().to_string();
    let locks = LockClient::new(client.clone(), &namespace);
    let cms: Api<ConfigMap> = Api::namespaced(client, &namespace);
    match args.command {
        Command::Open { stock, no_fence } => {
            let guard = locks.acquire(AcquireOptions::new(&args.lock)).await?;
            let mut cm = ConfigMap {
                metadata: ObjectMeta { name: Some(args.lock.clone()), ..Default::default() },
                data: Some([("stock".to_string(), stock.to_string()), ("sales".to_string(), String::new())].into()),
                ..Default::default()
            };
            if !no_fence {
                guard.fence(&mut cm);
            }
            cms.create(&PostParams::default(), &cm).await?;
            guard.release().await?;
            println!("shop open: stock {stock}, {}", if no_fence { "NOT fenced" } else { "fenced" });
        }
        Command::Buy { name, count, freeze_after_read, record } => {
            for n in 1..=count {
                let guard = locks.acquire(AcquireOptions::new(&args.lock)).await?;
                let read = cms.get(&args.lock).await?;
                let (stock, mut sales) = stock_of(&read);
                if stock <= 0 {
                    println!("{name}: sold out");
                    guard.release().await?;
                    break;
                }
                let sale = format!("{name}-{n}");
                if freeze_after_read {
                    println!(
                        "{name}: read stock {stock} with token {}; freezing (pid {})",
                        guard.token(),
                        std::process::id()
                    );
                    rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::STOP)?;
                    println!("{name}: thawed; writing stock {} (holding now: {})", stock - 1, guard.is_holding());
                }
                sales.push(sale.clone());
                let patch = serde_json::json!({
                    "metadata": {"annotations": {FENCING_TOKEN_ANNOTATION: guard.token().to_string()}},
                    "data": {"stock": (stock - 1).to_string(), "sales": sales.join(",")},
                });
                match cms.patch(&args.lock, &PatchParams::default(), &Patch::Merge(&patch)).await {
                    Ok(_) => {
                        println!("{name}: sold {sale} with token {}, stock now {}", guard.token(), stock - 1);
                        if let Some(file) = &record {
                            writeln!(std::fs::OpenOptions::new().create(true).append(true).open(file)?, "{sale}")?;
                        }
                    }
                    Err(kube::Error::Api(e)) if e.code == 403 => {
                        println!("{name}: the API server REFUSED the sale {sale}: {}", e.message);
                    }
                    Err(e) => return Err(e.into()),
                }
                // A holder that lost its grant has nothing to release; the guard says so.
                let _ = guard.release().await;
                tokio::time::sleep(Duration::from_millis(100)).await; // a customer's pace
            }
        }
        Command::Audit { opened, record } => {
            let (stock, ledger) = stock_of(&cms.get(&args.lock).await?);
            let mut recorded: Vec<String> = match &record {
                Some(file) => std::fs::read_to_string(file).unwrap_or_default().lines().map(String::from).collect(),
                None => ledger.clone(),
            };
            recorded.sort();
            let mut in_ledger = ledger.clone();
            in_ledger.sort();
            let lost: Vec<&String> = recorded.iter().filter(|s| !in_ledger.contains(s)).collect();
            println!("stock {stock}, {} sales in the ledger, {} recorded by buyers", ledger.len(), recorded.len());
            if stock + ledger.len() as i64 != opened || !lost.is_empty() || recorded.len() as i64 > opened {
                println!(
                    "INCONSISTENT: opened with {opened}; sales the buyers made but the ledger lost: {lost:?}; \
                     items sold: {} of {opened}",
                    recorded.len()
                );
                std::process::exit(1);
            }
            println!("consistent: every sale applied exactly once, never oversold");
        }
    }
    Ok(())
}
