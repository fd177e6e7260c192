//! The peers kubelock is compared with, on the same control plane in the same run:
//! 4. client-go-style leader election on a Lease (poll every RetryPeriod, CAS on release);
//! 5. etcd's own lock API (v3 lock service through etcd's JSON gateway).

use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    Budget,
    stats::Samples,
    sys::{base64, http, metric_sum},
};

// ---------------------------------------------------------------------------------------
// 4. Lease polling, as client-go's leaderelection does it.

/// client-go's defaults: RetryPeriod 2 s, jittered by `wait.JitterUntil(.., JitterFactor 1.2,
/// sliding)`: each wait is uniform in [2 s, 4.4 s] and starts after the previous attempt.
pub const RETRY_PERIOD: Duration = Duration::from_secs(2);
const JITTER_FACTOR: f64 = 1.2;
const LEASE: &str = "bench-leader-election";

enum LeaseEvent {
    Acquired { at: Instant },
    Released { at: Instant },
}

/// Item 4: release (holderIdentity cleared by a CAS, as with ReleaseOnCancel) → a polling waiter
/// CASes itself in. `waiters` candidates poll while one holds; each hold lasts a random
/// 0.2–1.0 s so that releases fall at random points of the waiters' polling cycles.
pub async fn lease_polling(leases: &Api<Lease>, waiters: usize, budget: Budget) -> anyhow::Result<Samples> {
    let empty = Lease {
        metadata: ObjectMeta { name: Some(LEASE.into()), ..Default::default() },
        spec: Some(LeaseSpec { lease_duration_seconds: Some(15), ..Default::default() }),
    };
    leases.create(&PostParams::default(), &empty).await?;
    let stop = CancellationToken::new();
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let mut release_txs = Vec::new();
    let mut tasks = Vec::new();
    for id in 0..=waiters {
        let (tx, rx) = mpsc::unbounded_channel::<()>();
        release_txs.push(tx);
        tasks.push(tokio::spawn(candidate(
            format!("candidate-{id}"),
            id,
            leases.clone(),
            rx,
            ev_tx.clone(),
            stop.clone(),
        )));
    }
    let result = async {
        // The first acquisition is not a sample.
        let mut holder = match ev_rx.recv().await {
            Some((id, LeaseEvent::Acquired { .. })) => id,
            _ => bail!("no candidate acquired the lease"),
        };
        let mut samples = Samples::default();
        let start = Instant::now();
        while !budget.done(start, samples.len()) {
            // Workload: hold for a random while.
            tokio::time::sleep(Duration::from_millis(rand::random_range(200..1000))).await;
            release_txs[holder].send(()).map_err(|_| anyhow!("candidate {holder} is gone"))?;
            let mut released = None;
            let mut acquired = None;
            while released.is_none() || acquired.is_none() {
                match ev_rx.recv().await.ok_or_else(|| anyhow!("candidates are gone"))? {
                    (_, LeaseEvent::Released { at }) => released = Some(at),
                    (id, LeaseEvent::Acquired { at }) => acquired = Some((id, at)),
                }
            }
            let (t0, (next, t1)) =
                (released.unwrap_or_else(Instant::now), acquired.unwrap_or((holder, Instant::now())));
            samples.push(t1.saturating_duration_since(t0));
            holder = next;
        }
        Ok(samples)
    }
    .await;
    stop.cancel();
    for t in tasks {
        if let Ok(Err(e)) = t.await {
            tracing::warn!(error = %e, "lease candidate");
        }
    }
    result
}

async fn candidate(
    identity: String,
    id: usize,
    leases: Api<Lease>,
    mut release: mpsc::UnboundedReceiver<()>,
    events: mpsc::UnboundedSender<(usize, LeaseEvent)>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        // Waiting: tryAcquireOrRenew, then a jittered RetryPeriod, until it wins.
        let mut held = loop {
            let current = leases.get(LEASE).await?;
            let free = current.spec.as_ref().and_then(|s| s.holder_identity.as_deref()).unwrap_or("").is_empty();
            if free {
                let mut next = current.clone();
                let now = MicroTime(jiff::Timestamp::now());
                let spec = next.spec.get_or_insert_with(Default::default);
                spec.holder_identity = Some(identity.clone());
                spec.lease_duration_seconds = Some(15);
                spec.acquire_time = Some(now.clone());
                spec.renew_time = Some(now);
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                match leases.replace(LEASE, &PostParams::default(), &next).await {
                    Ok(written) => {
                        let _ = events.send((id, LeaseEvent::Acquired { at: Instant::now() }));
                        break written;
                    }
                    Err(kube::Error::Api(s)) if s.code == 409 => {}
                    Err(e) => return Err(e.into()),
                }
            }
            let wait = RETRY_PERIOD.mul_f64(1.0 + rand::random::<f64>() * JITTER_FACTOR);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.cancelled() => return Ok(()),
            }
        };
        // Holding (holds are shorter than RenewDeadline: no renewal needed) until told to release.
        tokio::select! {
            r = release.recv() => if r.is_none() { return Ok(()) },
            _ = stop.cancelled() => return Ok(()),
        }
        let t0 = Instant::now();
        // ReleaseOnCancel: clear holderIdentity with a CAS on the record we hold.
        let spec = held.spec.get_or_insert_with(Default::default);
        spec.holder_identity = Some(String::new());
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(jiff::Timestamp::now()));
        leases.replace(LEASE, &PostParams::default(), &held).await.context("releasing the lease")?;
        let _ = events.send((id, LeaseEvent::Released { at: t0 }));
        // Start polling after one period, as a standby would.
        tokio::select! {
            _ = tokio::time::sleep(RETRY_PERIOD.mul_f64(1.0 + rand::random::<f64>() * JITTER_FACTOR)) => {}
            _ = stop.cancelled() => return Ok(()),
        }
    }
}

// ---------------------------------------------------------------------------------------
// 5. etcd's lock service.

const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

async fn etcd_post(addr: &str, path: &str, body: Value) -> anyhow::Result<Value> {
    let (status, text) = http(addr, "POST", path, Some(&body.to_string()), HTTP_TIMEOUT).await?;
    if status != 200 {
        bail!("etcd {path}: HTTP {status}: {text}");
    }
    serde_json::from_str(&text).with_context(|| format!("etcd {path}: {text}"))
}

async fn etcd_lease(addr: &str) -> anyhow::Result<String> {
    let answer = etcd_post(addr, "/v3/lease/grant", json!({ "TTL": 600 })).await?;
    answer["ID"].as_str().map(str::to_string).ok_or_else(|| anyhow!("no lease ID in {answer}"))
}

async fn etcd_lock(addr: String, name: String, lease: String) -> anyhow::Result<(String, Instant)> {
    let answer = etcd_post(&addr, "/v3/lock/lock", json!({ "name": base64(name.as_bytes()), "lease": lease })).await?;
    let at = Instant::now();
    let key = answer["key"].as_str().ok_or_else(|| anyhow!("no key in {answer}"))?;
    Ok((key.to_string(), at))
}

/// How many lock keys (holder and waiters) exist under the lock's prefix.
async fn etcd_lockers(addr: &str, name: &str) -> anyhow::Result<u64> {
    let prefix = format!("{name}/");
    let mut end = prefix.clone().into_bytes();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    let answer = etcd_post(
        addr,
        "/v3/kv/range",
        json!({ "key": base64(prefix.as_bytes()), "range_end": base64(&end), "count_only": true }),
    )
    .await?;
    Ok(answer["count"].as_str().and_then(|c| c.parse().ok()).or_else(|| answer["count"].as_u64()).unwrap_or(0))
}

/// etcd's watcher gauges: (all watchers, unsynced ones).
async fn etcd_watchers(addr: &str) -> anyhow::Result<(f64, f64)> {
    let (status, text) = http(addr, "GET", "/metrics", None, HTTP_TIMEOUT).await?;
    if status != 200 {
        bail!("etcd /metrics: HTTP {status}");
    }
    Ok((
        metric_sum(&text, "etcd_debugging_mvcc_watcher_total"),
        metric_sum(&text, "etcd_debugging_mvcc_slow_watcher_total"),
    ))
}

/// Item 5: unlock → the waiter's (blocking) lock call returns. One holder, one waiter, swapping.
pub async fn etcd_lock_handover(endpoint: &str, budget: Budget) -> anyhow::Result<Samples> {
    let addr = endpoint.trim_start_matches("http://").trim_end_matches('/').to_string();
    let name = "bench-etcd-lock".to_string();
    let leases = [etcd_lease(&addr).await?, etcd_lease(&addr).await?];
    let (mut held_key, _) = etcd_lock(addr.clone(), name.clone(), leases[0].clone()).await?;
    let mut waiter = 1;
    let mut samples = Samples::default();
    let start = Instant::now();
    let (base_watchers, _) = etcd_watchers(&addr).await?;
    while !budget.done(start, samples.len()) {
        let call = tokio::spawn(etcd_lock(addr.clone(), name.clone(), leases[waiter].clone()));
        // Until the waiter is really waiting: its key is in place and its watch on the
        // holder's key is registered *and synced*. etcd catches up an unsynced watcher only in
        // a loop that runs every 100 ms, and the lock service starts its watch at the current
        // revision, which etcd treats as unsynced: releasing before that sync would add up to
        // 100 ms that a waiter that had been waiting a while does not see. Polled every 2 ms.
        let ready_by = Instant::now() + Duration::from_secs(10);
        loop {
            let (watchers, slow) = etcd_watchers(&addr).await?;
            if watchers > base_watchers && slow == 0.0 && etcd_lockers(&addr, &name).await? >= 2 {
                break;
            }
            if Instant::now() > ready_by {
                bail!("the etcd lock waiter never settled (watchers {watchers}, unsynced {slow})");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let t0 = Instant::now();
        etcd_post(&addr, "/v3/lock/unlock", json!({ "key": held_key })).await?;
        let (key, at) = call.await??;
        samples.push(at.saturating_duration_since(t0));
        held_key = key;
        waiter = 1 - waiter;
    }
    etcd_post(&addr, "/v3/lock/unlock", json!({ "key": held_key })).await?;
    Ok(samples)
}

// ---------------------------------------------------------------------------------------
// 9. ZooKeeper's lock recipe (kazoo's `Lock`), on a standalone ZooKeeper on loopback with its
// transaction log on the same disk as etcd's data (fsync per write, as etcd).

/// Where Debian's `zookeeper` package puts the server (override: `ZOOKEEPER_CLASSPATH`).
const ZOOKEEPER_JAR: &str = "/usr/share/java/zookeeper.jar";

/// A standalone ZooKeeper server, killed with the bench.
pub struct ZooKeeper {
    child: std::process::Child,
    pub hosts: String,
}

impl ZooKeeper {
    /// Starts one in `dir` (its config, data and log) and waits until it answers `ruok`.
    pub async fn start(dir: &std::path::Path) -> anyhow::Result<ZooKeeper> {
        let classpath = std::env::var("ZOOKEEPER_CLASSPATH").unwrap_or_else(|_| ZOOKEEPER_JAR.into());
        if !classpath.split(':').any(|p| std::path::Path::new(p).exists()) {
            bail!("ZooKeeper not installed ({classpath} missing): `make bench-peers` installs Debian's zookeeper");
        }
        let data = dir.join("data");
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(&data)?;
        let port = crate::sys::free_port()?;
        let cfg = dir.join("zoo.cfg");
        std::fs::write(
            &cfg,
            format!(
                "tickTime=2000\ndataDir={}\nclientPort={port}\nclientPortAddress=127.0.0.1\n\
                 admin.enableServer=false\n4lw.commands.whitelist=ruok\nmaxClientCnxns=0\n",
                data.display()
            ),
        )?;
        let log = std::fs::File::create(dir.join("zookeeper.log"))?;
        let mut cmd = kubelock::devenv::guarded_command("java");
        cmd.args(["-cp", &classpath, "org.apache.zookeeper.server.ZooKeeperServerMain"])
            .arg(&cfg)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = kubelock::devenv::spawn_guarded(cmd).context("starting java (ZooKeeper)")?;
        let mut zk = ZooKeeper { child, hosts: format!("127.0.0.1:{port}") };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = zk.child.try_wait()? {
                bail!("ZooKeeper exited ({status}); see {}", dir.join("zookeeper.log").display());
            }
            if zk.ruok().await {
                return Ok(zk);
            }
            if Instant::now() > deadline {
                bail!("ZooKeeper did not answer on {} within 60 s", zk.hosts);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn ruok(&self) -> bool {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let Ok(mut s) = tokio::net::TcpStream::connect(&self.hosts).await else { return false };
        let mut answer = String::new();
        s.write_all(b"ruok").await.is_ok() && s.read_to_string(&mut answer).await.is_ok() && answer == "imok"
    }

    /// `examples/bench/zookeeper.py ARGS` against this server: its JSON answer.
    async fn script(&self, args: &[String]) -> anyhow::Result<Value> {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/bench/zookeeper.py");
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        let out = tokio::process::Command::new(&python)
            .arg(script)
            .args(["--hosts", &self.hosts])
            .args(args)
            .kill_on_drop(true)
            .output()
            .await
            .with_context(|| format!("running {python} {script}"))?;
        if !out.status.success() {
            bail!(
                "{script} {}: {}\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).lines().rev().take(8).collect::<Vec<_>>().join("\n")
            );
        }
        serde_json::from_slice(&out.stdout).with_context(|| format!("{script} printed no JSON"))
    }

    /// Release → the next client's `acquire()` returns, `waiters` waiting.
    pub async fn handover(&self, waiters: usize, budget: Budget) -> anyhow::Result<Samples> {
        let v = self
            .script(&[
                "handover".into(),
                format!("--waiters={waiters}"),
                format!("--samples={}", budget.samples),
                format!("--seconds={}", budget.time.as_secs_f64().max(5.0)),
            ])
            .await?;
        let mut samples = Samples::default();
        for ms in v["samples_ms"].as_array().context("no samples_ms")? {
            samples.push(Duration::from_secs_f64(ms.as_f64().unwrap_or(0.0) / 1e3));
        }
        Ok(samples)
    }

    /// `clients` acquiring and releasing at once for `window`: (grants, seconds).
    pub async fn throughput(&self, clients: usize, window: Duration) -> anyhow::Result<(u64, f64)> {
        let v = self
            .script(&[
                "throughput".into(),
                format!("--clients={clients}"),
                format!("--seconds={}", window.as_secs_f64()),
            ])
            .await?;
        Ok((v["grants"].as_u64().context("no grants")?, v["seconds"].as_f64().context("no seconds")?))
    }
}

impl Drop for ZooKeeper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
