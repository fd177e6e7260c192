//! `make bench`: kubelock against its floors and its peers, on a local control plane with
//! etcd on disk, in one run. Prints a table with ratios and the targets, and writes
//! `target/bench/report.json`.
//!
//! What is measured (see README "Performance"):
//! 1. write floor: CAS PUT of a Lease;
//! 2. handover floor: DELETE marker → waiter's watch event → CREATE (no operator);
//! 3. kubelock handover: release (request marked released) → next waiter observes its grant,
//!    mutex and 3-permit semaphore, 2 and 16 waiters queued;
//! 4. peer: client-go-style Lease polling (RetryPeriod 2 s, ReleaseOnCancel);
//! 5. peer: etcd's lock API on the same etcd;
//! 6. throughput: 100 Locks × 4 clients, and one hot Lock × 32 clients;
//! 7. scale: controller started against 10,000 Locks and 20,000 LockRequests;
//! 8. renewal: 1,000 holders renewing at the default lease;
//! 9. peer: ZooKeeper's lock recipe (kazoo), handover and hot-lock throughput;
//! 10. a long queue: 100,000 requests on one Lock, API writes per grant and controller RSS.
//!
//! Environment: `BENCH_QUICK=1` (small, ~2 min), `BENCH_ONLY=1,2,3` (some items),
//! `BENCH_SCALE_LOCKS`, `BENCH_QUEUE` (item 10's length), `BENCH_RENEW_HOLDERS`, `BENCH_THROUGHPUT_SECS`, `BENCH_IDLE_SECS`,
//! `BENCH_BUDGET_SECS` (whole run, default 540: the scale settle gets what is left),
//! `BENCH_TRACE=1` (controller logs at
//! `kubelock=trace`, kept in target/bench/), `BENCH_CONTROLLER_ARGS` (extra controller flags),
//! `KUBELOCK_BIN` (controller binary; default target/release/kubelock).

mod floor;
mod handover;
mod peers;
mod queue;
mod requester;
mod scale;
mod stats;
mod sys;
mod throughput;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Namespace};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};
use kubelock::{
    api::{Lock, LockRequest},
    devenv::{Component, ControlPlane, ControlPlaneOptions, Identity},
};
use serde_json::{Map, Value, json};

use crate::stats::{Samples, fmt_dur, ratio};

/// What the generic helpers need of an object kind (Lease, Lock, LockRequest).
pub trait Object:
    kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static
{
}

impl<K> Object for K where
    K: kube::Resource
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static
{
}

/// When a latency measurement stops: after `samples`, or after `time`, whichever comes first.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    pub samples: usize,
    pub time: Duration,
}

impl Budget {
    pub fn done(&self, start: Instant, n: usize) -> bool {
        n >= self.samples || (start.elapsed() >= self.time && n > 0)
    }
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Sizes of the run.
struct Config {
    quick: bool,
    only: Option<BTreeSet<u8>>,
    latency: Budget,
    handover: Budget,
    lease: Budget,
    throughput_window: Duration,
    throughput_locks: usize,
    throughput_per_lock: usize,
    hot_clients: usize,
    scale_locks: usize,
    idle: Duration,
    renew_holders: usize,
    renew_window: Duration,
    queue_len: usize,
    queue_grants: usize,
    budget: Duration,
    trace: bool,
    controller_args: Vec<String>,
}

impl Config {
    fn from_env() -> Config {
        let quick = std::env::var("BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let q = |full: u64, quick_value: u64| if quick { quick_value } else { full };
        let only = std::env::var("BENCH_ONLY")
            .ok()
            .filter(|v| !v.is_empty())
            .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect());
        Config {
            quick,
            only,
            latency: Budget { samples: q(300, 50) as usize, time: Duration::from_secs(q(10, 3)) },
            handover: Budget { samples: q(150, 30) as usize, time: Duration::from_secs(q(12, 4)) },
            lease: Budget { samples: q(18, 5) as usize, time: Duration::from_secs(q(40, 12)) },
            throughput_window: Duration::from_secs(env_num("BENCH_THROUGHPUT_SECS", q(20, 5))),
            throughput_locks: q(100, 20) as usize,
            throughput_per_lock: 4,
            hot_clients: q(32, 8) as usize,
            scale_locks: env_num("BENCH_SCALE_LOCKS", q(10_000, 1_000)) as usize,
            idle: Duration::from_secs(env_num("BENCH_IDLE_SECS", q(20, 5))),
            renew_holders: env_num("BENCH_RENEW_HOLDERS", q(1_000, 200)) as usize,
            renew_window: Duration::from_secs(q(30, 10)),
            queue_len: env_num("BENCH_QUEUE", q(100_000, 2_000)) as usize,
            queue_grants: q(50, 20) as usize,
            budget: Duration::from_secs(env_num("BENCH_BUDGET_SECS", 570)),
            trace: std::env::var("BENCH_TRACE").is_ok_and(|v| !v.is_empty() && v != "0"),
            controller_args: std::env::var("BENCH_CONTROLLER_ARGS")
                .map(|v| v.split_whitespace().map(str::to_string).collect())
                .unwrap_or_default(),
        }
    }

    fn runs(&self, item: u8) -> bool {
        self.only.as_ref().is_none_or(|o| o.contains(&item))
    }
}

/// Everything measured, for the table and the JSON.
#[derive(Default)]
struct Results {
    write_floor: Option<Samples>,
    cr_write_floor: Option<Samples>,
    handover_floor: Option<Samples>,
    cr_handover_floor: Option<Samples>,
    handover_floor_again: Option<Samples>,
    handovers: Vec<(String, handover::Handover)>,
    lease_polling: Option<Samples>,
    etcd_lock: Option<Samples>,
    zookeeper_handover: Option<Samples>,
    /// Hot lock on ZooKeeper: (clients, grants, seconds).
    zookeeper_throughput: Option<(usize, u64, f64)>,
    queue: Option<queue::Queue>,
    throughput: Vec<(String, throughput::Throughput)>,
    scale: Option<scale::Scale>,
    renewal: Option<scale::Renewal>,
    controller_a: Option<Value>,
    errors: Vec<(String, String)>,
    load: Vec<(String, [f64; 3])>,
    /// etcd's address (host:port) once it runs.
    etcd: Option<String>,
    /// Processes whose CPU time each step records.
    pids: Vec<(&'static str, u32)>,
    steps: Vec<Step>,
}

/// The state at the start of a step.
struct Step {
    label: String,
    at: Instant,
    fsync: Option<sys::Histogram>,
    /// CPU seconds by process name: (pid, seconds).
    cpu: BTreeMap<String, (u32, f64)>,
}

/// What happened during one step.
struct StepFigures {
    label: String,
    secs: f64,
    /// etcd WAL fsyncs: count, p50 ms, p99 ms.
    fsync: Option<(f64, Option<f64>, Option<f64>)>,
    /// CPU seconds used, by process.
    cpu: BTreeMap<String, f64>,
}

impl Results {
    /// Marks the start of a step: load average, etcd's WAL fsync histogram and the CPU time
    /// of etcd, kube-apiserver, the controller and this process (a step's figures are the
    /// differences to the next step's).
    async fn step(&mut self, item: &str) {
        let load = sys::loadavg();
        eprintln!("== {item}   (load average {:.2} {:.2} {:.2})", load[0], load[1], load[2]);
        self.load.push((item.to_string(), load));
        let mut fsync = None;
        if let Some(addr) = &self.etcd {
            match sys::http(addr, "GET", "/metrics", None, Duration::from_secs(10)).await {
                Ok((200, text)) => fsync = Some(sys::Histogram::parse(&text, "etcd_disk_wal_fsync_duration_seconds")),
                _ => eprintln!("   (etcd /metrics unavailable)"),
            }
        }
        let cpu = self
            .pids
            .iter()
            .filter_map(|(name, pid)| Some((name.to_string(), (*pid, sys::cpu_seconds(*pid).ok()?))))
            .collect();
        self.steps.push(Step { label: item.to_string(), at: Instant::now(), fsync, cpu });
    }

    /// Per step: its label, duration, etcd fsyncs (count, p50 ms, p99 ms) and CPU seconds by
    /// process.
    fn step_figures(&self) -> Vec<StepFigures> {
        self.steps
            .windows(2)
            .map(|w| {
                let fsync = match (&w[0].fsync, &w[1].fsync) {
                    (Some(a), Some(b)) => {
                        let d = b.since(a);
                        Some((d.count, d.quantile(0.5).map(|v| v * 1e3), d.quantile(0.99).map(|v| v * 1e3)))
                    }
                    _ => None,
                };
                let cpu = w[0]
                    .cpu
                    .iter()
                    .filter_map(|(name, (pid, c0))| match w[1].cpu.get(name) {
                        Some((pid1, c1)) if pid1 == pid => Some((name.clone(), c1 - c0)),
                        _ => None,
                    })
                    .collect();
                StepFigures {
                    label: w[0].label.clone(),
                    secs: w[1].at.duration_since(w[0].at).as_secs_f64(),
                    fsync,
                    cpu,
                }
            })
            .collect()
    }

    fn set_pid(&mut self, name: &'static str, pid: Option<u32>) {
        self.pids.retain(|(n, _)| *n != name);
        if let Some(pid) = pid {
            self.pids.push((name, pid));
        }
    }

    fn failed(&mut self, item: &str, e: anyhow::Error) {
        eprintln!("!! {item} failed: {e:#}");
        self.errors.push((item.to_string(), format!("{e:#}")));
    }
}

fn paths() -> anyhow::Result<(PathBuf, PathBuf)> {
    // target/<profile>/examples/bench → target/<profile>/kubelock, target/bench/
    let exe = std::env::current_exe()?;
    let profile_dir = exe.parent().and_then(Path::parent).context("cannot locate the target directory")?.to_path_buf();
    let binary = std::env::var_os("KUBELOCK_BIN").map(PathBuf::from).unwrap_or_else(|| profile_dir.join("kubelock"));
    let out = profile_dir.parent().context("cannot locate the target directory")?.join("bench");
    Ok((binary, out))
}

/// The filesystem a path lives on (longest mount point of /proc/mounts): `ext4 /dev/vda`.
fn filesystem_of(path: &Path) -> String {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && path.starts_with(f[1])).then(|| (f[1].len(), format!("{} {} on {}", f[2], f[0], f[1])))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, s)| s)
        .unwrap_or_else(|| "unknown".into())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = kubelock::telemetry::init_tracing(
        &std::env::var("BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        kubelock::telemetry::LogFormat::Text,
    );
    let config = Config::from_env();
    let (binary, out_dir) = paths()?;
    if !binary.is_file() {
        bail!("{} not found: build it with `cargo build --release --bin kubelock` (make bench does)", binary.display());
    }
    std::fs::create_dir_all(&out_dir)?;
    let run_start = Instant::now();
    let machine = sys::machine_info();
    let mut r = Results::default();
    r.step("start").await;
    eprintln!(
        "kubelock bench: {} ({} CPUs), kernel {}; {}",
        machine["cpu_model"],
        machine["nproc"],
        machine["kernel"],
        if config.quick { "QUICK run" } else { "full run" }
    );

    eprintln!("starting etcd (data on disk) and kube-apiserver...");
    let cp = ControlPlane::start(ControlPlaneOptions { etcd_on_disk: true, ..Default::default() }).await?;
    let etcd_fs = filesystem_of(&cp.etcd_data_dir());
    eprintln!("control plane at {}; etcd {} (data: {etcd_fs})", cp.server(), cp.etcd_endpoint());
    r.etcd = Some(cp.etcd_endpoint().trim_start_matches("http://").trim_end_matches('/').to_string());
    r.set_pid("etcd", cp.pid(Component::Etcd));
    r.set_pid("kube-apiserver", cp.pid(Component::ApiServer));
    r.set_pid("bench", Some(std::process::id()));
    let client = cp.client(Identity::Admin).await?;
    kubelock::devenv::install_crds(&client, Duration::from_secs(60)).await?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for ns in ["bench", "bench-floor", "bench-scale", "bench-queue"] {
        namespaces
            .create(
                &PostParams::default(),
                &Namespace {
                    metadata: ObjectMeta { name: Some(ns.into()), ..Default::default() },
                    ..Default::default()
                },
            )
            .await?;
    }
    let leases: Api<Lease> = Api::namespaced(client.clone(), "bench");
    let locks: Api<Lock> = Api::namespaced(client.clone(), "bench");
    let requests: Api<LockRequest> = Api::namespaced(client.clone(), "bench");
    // Custom-resource floors, where no controller ever watches.
    let floor_locks: Api<Lock> = Api::namespaced(client.clone(), "bench-floor");
    let floor_requests: Api<LockRequest> = Api::namespaced(client.clone(), "bench-floor");

    // --- no operator involved --------------------------------------------------------------
    if config.runs(1) {
        r.step("1. write floor").await;
        match floor::write_floor(&leases, config.latency).await {
            Ok(s) => r.write_floor = Some(s),
            Err(e) => r.failed("1. write floor", e),
        }
    }
    if config.runs(1) {
        r.step("1b. write floor, custom resource status").await;
        match floor::cr_write_floor(&floor_locks, config.latency).await {
            Ok(s) => r.cr_write_floor = Some(s),
            Err(e) => r.failed("1b. write floor, custom resource", e),
        }
    }
    if config.runs(2) {
        r.step("2. handover floor").await;
        match floor::handover_floor(&leases, floor::lease_marker, config.latency).await {
            Ok(s) => r.handover_floor = Some(s),
            Err(e) => r.failed("2. handover floor", e),
        }
        r.step("2b. handover floor, custom resource").await;
        match floor::handover_floor(&floor_requests, floor::request_marker, config.latency).await {
            Ok(s) => r.cr_handover_floor = Some(s),
            Err(e) => r.failed("2b. handover floor, custom resource", e),
        }
    }
    if config.runs(5) {
        r.step("5. etcd lock").await;
        match peers::etcd_lock_handover(cp.etcd_endpoint(), config.latency).await {
            Ok(s) => r.etcd_lock = Some(s),
            Err(e) => r.failed("5. etcd lock", e),
        }
    }
    if config.runs(4) {
        r.step("4. Lease polling").await;
        match peers::lease_polling(&leases, 2, config.lease).await {
            Ok(s) => r.lease_polling = Some(s),
            Err(e) => r.failed("4. Lease polling", e),
        }
    }

    if config.runs(9) {
        r.step("9. ZooKeeper lock").await;
        let zk = async {
            let zk = peers::ZooKeeper::start(&out_dir.join("zookeeper")).await?;
            let handover = zk.handover(2, config.handover).await?;
            let (grants, secs) = zk.throughput(config.hot_clients, config.throughput_window).await?;
            anyhow::Ok((handover, grants, secs))
        };
        match zk.await {
            Ok((h, grants, secs)) => {
                r.zookeeper_handover = Some(h);
                r.zookeeper_throughput = Some((config.hot_clients, grants, secs));
            }
            Err(e) => r.failed("9. ZooKeeper lock", e),
        }
    }

    // --- kubelock: latency and throughput ----------------------------------------------------
    let mut ctl_args = config.controller_args.clone();
    if config.trace {
        ctl_args.extend(["--log".into(), "kubelock=trace,info".into()]);
    }
    if config.runs(3) || config.runs(6) {
        let mut controller =
            sys::Controller::start(&binary, &cp.kubeconfig(Identity::Admin), "bench", &out_dir, "latency", &ctl_args)?;
        controller.wait_ready(Duration::from_secs(60)).await?;
        r.set_pid("controller", Some(controller.pid()));
        let first = controller.snapshot().await?;
        if config.runs(3) {
            for (permits, waiters) in [(1, 2), (1, 16), (3, 2), (3, 16)] {
                let label = format!(
                    "{} {waiters} waiting",
                    if permits == 1 { "mutex".to_string() } else { format!("semaphore({permits})") }
                );
                let name = format!("h-p{permits}-w{waiters}");
                r.step(&format!("3. kubelock handover, {label}")).await;
                match handover::handover(&locks, &requests, &name, permits, waiters, config.handover).await {
                    Ok(h) => {
                        if config.trace {
                            let lines: Vec<String> = h
                                .timeline
                                .iter()
                                .map(|(a, b, took)| {
                                    format!(
                                        "{a}\t{b}\t{:.2}\t{:.2}",
                                        b.duration_since(*a).as_secs_f64() * 1e3,
                                        took.as_secs_f64() * 1e3
                                    )
                                })
                                .collect();
                            std::fs::write(out_dir.join(format!("handover-{name}.tsv")), lines.join("\n") + "\n")?;
                        }
                        r.handovers.push((label, h));
                    }
                    Err(e) => r.failed(&format!("3. handover {label}"), e),
                }
            }
        }
        if config.runs(3) {
            // The same handover with the admission webhook reviewing every request write
            // (create, renewals, the release mark, the delete): what it costs.
            let label = "mutex 2 waiting, webhook on".to_string();
            r.step(&format!("3. kubelock handover, {label}")).await;
            match webhook_handover(&client, &locks, &requests, &out_dir, config.handover).await {
                Ok(h) => r.handovers.push((label, h)),
                Err(e) => r.failed("3. handover, webhook on", e),
            }
        }
        if config.runs(3) && config.runs(2) {
            // The floor again, now, so that a drift of the machine's load shows.
            r.step("2. handover floor, again after 3").await;
            match floor::handover_floor(&leases, floor::lease_marker_again, config.latency).await {
                Ok(s) => r.handover_floor_again = Some(s),
                Err(e) => r.failed("2. handover floor, again", e),
            }
        }
        if config.runs(6) {
            let runs =
                [("independent", config.throughput_locks, config.throughput_per_lock), ("hot", 1, config.hot_clients)];
            for (tag, n, per) in runs {
                let label = format!("{n} lock(s) x {per} clients");
                r.step(&format!("6. throughput, {label}")).await;
                let before = controller.snapshot().await?;
                let run = throughput::throughput(
                    &client,
                    &locks,
                    &requests,
                    &format!("tp-{tag}"),
                    n,
                    per,
                    config.throughput_window,
                )
                .await;
                match run {
                    Ok(mut t) => {
                        // Around the run (its setup and drain included), unlike the API server's
                        // counts, which are of the window.
                        t.controller_writes = controller.snapshot().await?.writes_since(&before);
                        r.throughput.push((label, t))
                    }
                    Err(e) => r.failed(&format!("6. throughput {label}"), e),
                }
            }
        }
        let last = controller.snapshot().await?;
        r.controller_a = Some(json!({
            "peak_rss_mib": scale::round(last.hwm_kib as f64 / 1024.0, 1),
            "cpu_s": scale::round(last.cpu - first.cpu, 2),
            "grants": last.grants - first.grants,
            "cas_conflicts": last.conflicts - first.conflicts,
            "reconcile_p50_ms": last.reconcile.since(&first.reconcile).quantile(0.5).map(|s| scale::round(s * 1e3, 2)),
            "reconcile_p99_ms": last.reconcile.since(&first.reconcile).quantile(0.99).map(|s| scale::round(s * 1e3, 2)),
            "writes": last.writes_since(&first),
            "events_dropped": last.events_dropped - first.events_dropped,
            "log": controller.log.display().to_string(),
        }));
        r.step("(latency and throughput done)").await;
        controller.stop().await;
        r.set_pid("controller", None);
    }

    // --- kubelock: scale and renewal -----------------------------------------------------------
    if config.runs(7) || config.runs(8) {
        let scale_locks: Api<Lock> = Api::namespaced(client.clone(), "bench-scale");
        let scale_requests: Api<LockRequest> = Api::namespaced(client.clone(), "bench-scale");
        let stop = tokio_util::sync::CancellationToken::new();
        let mut counts = scale::track(scale_locks.clone(), scale_requests.clone(), stop.clone());
        let n = config.scale_locks;
        let result: anyhow::Result<()> = async {
            let mut create_s = 0.0;
            if config.runs(7) {
                r.step(&format!("7. scale: creating {n} Locks and {} LockRequests", 2 * n)).await;
                create_s = scale::populate(&scale_locks, &scale_requests, n).await?.as_secs_f64();
                eprintln!("  created {} objects in {create_s:.1} s ({:.0}/s)", 3 * n, 3.0 * n as f64 / create_s);
                counts.wait_for(|c| c.synced).await?;
            }
            let mut controller = sys::Controller::start(
                &binary,
                &cp.kubeconfig(Identity::Admin),
                "bench-scale",
                &out_dir,
                "scale",
                &ctl_args,
            )?;
            r.set_pid("controller", Some(controller.pid()));
            r.step("7. scale: controller started, settling, then idle").await;
            let result = async {
                let mut idle = None;
                if config.runs(7) {
                    let left = config.budget.saturating_sub(run_start.elapsed());
                    // What must still fit after the settle: the quiet wait (<= 30 s), the idle
                    // window, and item 8 (create and grant its holders, quiet wait, window).
                    let after = Duration::from_secs(30) + config.idle + Duration::from_secs(70) + config.renew_window;
                    let deadline = left.saturating_sub(after).clamp(Duration::from_secs(30), Duration::from_secs(300));
                    let mut s = scale::settle(&client, &mut controller, &mut counts, n, deadline, config.idle).await?;
                    s.create_s = create_s;
                    idle = s.idle_cpu_per_s;
                    r.scale = Some(s);
                } else {
                    controller.wait_ready(Duration::from_secs(60)).await?;
                }
                if config.runs(8) {
                    r.step(&format!("8. renewal: {} holders", config.renew_holders)).await;
                    match scale::renewal(
                        &client,
                        &scale_locks,
                        &scale_requests,
                        &controller,
                        &mut counts,
                        config.renew_holders,
                        config.renew_window,
                        idle,
                    )
                    .await
                    {
                        Ok(x) => r.renewal = Some(x),
                        Err(e) => r.failed("8. renewal", e),
                    }
                }
                Ok(())
            }
            .await;
            r.step("(scale and renewal done)").await;
            controller.stop().await;
            r.set_pid("controller", None);
            result
        }
        .await;
        stop.cancel();
        if let Err(e) = result {
            r.failed("7. scale", e);
        }
    }

    if config.runs(10) {
        r.step(&format!("10. long queue: {} requests on one Lock", config.queue_len)).await;
        let run = queue::long_queue(
            &client,
            &binary,
            &cp.kubeconfig(Identity::Admin),
            "bench-queue",
            &out_dir,
            &ctl_args,
            config.queue_len,
            config.queue_grants,
        )
        .await;
        match run {
            Ok(q) => r.queue = Some(q),
            Err(e) => r.failed("10. long queue", e),
        }
    }

    r.step("end").await;
    let total = run_start.elapsed();
    let report = report(&config, &r, machine, &etcd_fs, total);
    let path = out_dir.join("report.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")?;
    print_table(&r, &report, total);
    println!("\nJSON: {}", path.display());
    drop(cp);
    if !r.errors.is_empty() {
        bail!(
            "{} item(s) failed: {}",
            r.errors.len(),
            r.errors.iter().map(|(i, _)| i.as_str()).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Report.

/// The figures the targets and ratios are computed from.
struct Key {
    floor: Option<Duration>,
    cr_floor: Option<Duration>,
    mutex2: Option<Duration>,
    lease: Option<Duration>,
    etcd: Option<Duration>,
    zookeeper: Option<Duration>,
}

fn key(r: &Results) -> Key {
    Key {
        // The mean of the floor's p50 before and after item 3 (when both were measured).
        floor: {
            let p = [&r.handover_floor, &r.handover_floor_again].map(|s| s.as_ref().and_then(Samples::p50));
            match p {
                [Some(a), Some(b)] => Some((a + b) / 2),
                [a, b] => a.or(b),
            }
        },
        cr_floor: r.cr_handover_floor.as_ref().and_then(Samples::p50),
        mutex2: r.handovers.iter().find(|(l, _)| l == "mutex 2 waiting").and_then(|(_, h)| h.samples.p50()),
        lease: r.lease_polling.as_ref().and_then(Samples::p50),
        etcd: r.etcd_lock.as_ref().and_then(Samples::p50),
        zookeeper: r.zookeeper_handover.as_ref().and_then(Samples::p50),
    }
}

/// (name, measured, target, pass) of the targets.
fn targets(r: &Results) -> Vec<(String, String, String, Option<bool>)> {
    let k = key(r);
    let mut t = Vec::new();
    let vs_floor = ratio(k.mutex2, k.floor);
    t.push((
        "handover p50 / floor p50 (mutex, 2 waiting)".into(),
        vs_floor.map_or("-".into(), |v| format!("{v:.2}x")),
        "<= 1.5x".into(),
        vs_floor.map(|v| v <= 1.5),
    ));
    let vs_lease = ratio(k.lease, k.mutex2);
    t.push((
        "Lease-polling p50 / handover p50".into(),
        vs_lease.map_or("-".into(), |v| format!("{v:.0}x faster")),
        ">= 50x".into(),
        vs_lease.map(|v| v >= 50.0),
    ));
    for (label, tp) in &r.throughput {
        let hot = tp.locks == 1;
        let goal = if hot { 50.0 } else { 80.0 };
        t.push((
            format!("throughput, {label}, hold 0"),
            format!("{:.1} grants/s", tp.per_second()),
            format!(">= {goal:.0} grants/s"),
            Some(tp.per_second() >= goal),
        ));
        t.push((
            format!("API writes per grant, {label}"),
            tp.writes_per_grant().map_or("-".into(), |v| format!("{v:.2}")),
            "<= 4".into(),
            tp.writes_per_grant().map(|v| v <= 4.0),
        ));
    }
    if let Some(s) = &r.scale {
        let settle = s.all_mirrored_s.filter(|_| s.all_held_s.is_some());
        t.push((
            format!("{} locks settled (all granted and mirrored)", s.locks),
            settle.map_or(format!("not in time ({} held)", s.held), |v| format!("{v:.1} s")),
            "< 60 s".into(),
            Some(settle.is_some_and(|v| v < 60.0)),
        ));
        t.push((
            "controller peak RSS".into(),
            format!("{:.0} MiB", s.peak_rss_mib),
            "< 256 MiB".into(),
            Some(s.peak_rss_mib < 256.0),
        ));
        t.push((
            "idle controller CPU".into(),
            s.idle_cpu_per_s.map_or("-".into(), |v| format!("{:.2}% of a core", v * 100.0)),
            "near zero (< 1%)".into(),
            s.idle_cpu_per_s.map(|v| v < 0.01),
        ));
    }
    match &r.queue {
        Some(q) => {
            let per = q.writes_per_grant();
            t.push((
                format!("{} queued on one Lock: API writes per grant", q.queued),
                per.map_or("-".into(), |v| format!("{v:.2}")),
                "O(1): <= 8".into(),
                per.map(|v| v <= 8.0),
            ));
            t.push((
                format!("{} queued: controller peak RSS", q.queued),
                format!("{:.0} MiB", q.peak_rss_mib),
                "< 256 MiB".into(),
                Some(q.peak_rss_mib < 256.0),
            ));
        }
        None => t.push(("long queue on one Lock".into(), "not run".into(), "O(1), RSS < 256 MiB".into(), None)),
    }
    let hot = r.throughput.iter().find(|(_, tp)| tp.locks == 1).map(|(_, tp)| tp.per_second());
    let zk = r.zookeeper_throughput.map(|(_, g, s)| g as f64 / s);
    t.push((
        "hot-lock throughput, kubelock / ZooKeeper".into(),
        match (hot, zk) {
            (Some(h), Some(z)) if z > 0.0 => format!("{:.2}x ({h:.1} vs {z:.1}/s)", h / z),
            _ => "-".into(),
        },
        "reported (a ratio)".into(),
        None,
    ));
    t
}

fn report(config: &Config, r: &Results, machine: Value, etcd_fs: &str, total: Duration) -> Value {
    let k = key(r);
    let mut items = Map::new();
    if let Some(s) = &r.write_floor {
        items.insert("1_write_floor".into(), s.to_json());
    }
    if let Some(s) = &r.cr_write_floor {
        items.insert("1b_write_floor_custom_resource_status".into(), s.to_json());
    }
    if let Some(s) = &r.handover_floor {
        items.insert("2_handover_floor".into(), s.to_json());
    }
    if let Some(s) = &r.handover_floor_again {
        items.insert("2_handover_floor_again_after_3".into(), s.to_json());
    }
    if let Some(s) = &r.cr_handover_floor {
        items.insert("2b_handover_floor_custom_resource".into(), s.to_json());
    }
    let handovers: Map<String, Value> = r
        .handovers
        .iter()
        .map(|(l, h)| {
            let mut v = h.samples.to_json();
            v["grant_seen_first_via_lock_watch"] = json!(h.via_lock);
            v["grant_seen_first_via_request_watch"] = json!(h.via_request);
            (l.clone(), v)
        })
        .collect();
    if !handovers.is_empty() {
        items.insert("3_kubelock_handover".into(), Value::Object(handovers));
    }
    if let Some(s) = &r.lease_polling {
        let mut v = s.to_json();
        v["waiters"] = json!(2);
        v["retry_period_s"] = json!(peers::RETRY_PERIOD.as_secs_f64());
        v["jitter_factor"] = json!(1.2);
        items.insert("4_lease_polling_peer".into(), v);
    }
    if let Some(s) = &r.etcd_lock {
        items.insert("5_etcd_lock_peer".into(), s.to_json());
    }
    let tp: Map<String, Value> = r.throughput.iter().map(|(l, t)| (l.clone(), t.to_json())).collect();
    if !tp.is_empty() {
        items.insert("6_throughput".into(), Value::Object(tp));
    }
    if let Some(s) = &r.scale {
        items.insert("7_scale".into(), s.to_json());
    }
    if let Some(x) = &r.renewal {
        items.insert("8_renewal".into(), x.to_json());
    }
    if let Some(s) = &r.zookeeper_handover {
        let mut v = json!({ "handover_2_waiting": s.to_json() });
        if let Some((clients, grants, secs)) = r.zookeeper_throughput {
            v["hot_lock"] = json!({"clients": clients, "grants": grants, "seconds": scale::round(secs, 2),
                "grants_per_s": scale::round(grants as f64 / secs, 1)});
        }
        items.insert("9_zookeeper_lock_peer".into(), v);
    }
    if let Some(q) = &r.queue {
        items.insert("10_long_queue".into(), q.to_json());
    }
    let r2 = |v: Option<f64>| v.map(|v| scale::round(v, 2));
    json!({
        "machine": machine,
        "etcd_data": etcd_fs,
        "quick": config.quick,
        "load_average": r.load.iter().map(|(i, l)| json!({"at": i, "1m": l[0], "5m": l[1], "15m": l[2]})).collect::<Vec<_>>(),
        "duration_s": scale::round(total.as_secs_f64(), 1),
        "steps": r.step_figures().into_iter().map(|f| json!({
            "step": f.label,
            "seconds": scale::round(f.secs, 2),
            "etcd_wal_fsyncs": f.fsync.map(|(n, _, _)| n),
            "etcd_wal_fsync_p50_ms": f.fsync.and_then(|(_, p, _)| p).map(|v| scale::round(v, 2)),
            "etcd_wal_fsync_p99_ms": f.fsync.and_then(|(_, _, p)| p).map(|v| scale::round(v, 2)),
            "cpu_seconds": f.cpu.iter().map(|(k, v)| (k.clone(), json!(scale::round(*v, 2)))).collect::<Map<String, Value>>(),
        })).collect::<Vec<_>>(),
        "items": items,
        "controller_during_latency_and_throughput": r.controller_a,
        "ratios_p50": {
            "kubelock_mutex2_over_handover_floor": r2(ratio(k.mutex2, k.floor)),
            "kubelock_mutex2_over_custom_resource_handover_floor": r2(ratio(k.mutex2, k.cr_floor)),
            "lease_polling_over_kubelock_mutex2": r2(ratio(k.lease, k.mutex2)),
            "kubelock_mutex2_over_etcd_lock": r2(ratio(k.mutex2, k.etcd)),
            "kubelock_mutex2_over_zookeeper_lock": r2(ratio(k.mutex2, k.zookeeper)),
        },
        "targets": targets(r).into_iter().map(|(n, m, t, p)| json!({"target": n, "measured": m, "goal": t, "pass": p})).collect::<Vec<_>>(),
        "errors": r.errors.iter().map(|(i, e)| json!({"item": i, "error": e})).collect::<Vec<_>>(),
    })
}

fn print_table(r: &Results, report: &Value, total: Duration) {
    let m = &report["machine"];
    println!();
    println!("kubelock bench  {}", m["date"].as_str().unwrap_or(""));
    println!(
        "machine: {} x{} CPUs, kernel {}, {} MiB; etcd data: {}; run took {:.0} s",
        m["cpu_model"].as_str().unwrap_or("?"),
        m["nproc"],
        m["kernel"].as_str().unwrap_or("?"),
        m["mem_total_mib"],
        report["etcd_data"].as_str().unwrap_or("?"),
        total.as_secs_f64()
    );
    let loads: Vec<String> = r.load.iter().map(|(_, l)| format!("{:.1}", l[0])).collect();
    println!("load average (1 min) at each step: {}", loads.join(" "));
    println!();
    println!("{:<56} {:>5} {:>9} {:>9} {:>9}", "latency", "n", "p50", "p90", "p99");
    let row = |name: &str, s: &Samples| {
        println!(
            "{:<56} {:>5} {:>9} {:>9} {:>9}",
            name,
            s.len(),
            fmt_dur(s.p50()),
            fmt_dur(s.percentile(90.0)),
            fmt_dur(s.percentile(99.0))
        );
    };
    if let Some(s) = &r.write_floor {
        row("1 write floor: Lease CAS PUT", s);
    }
    if let Some(s) = &r.cr_write_floor {
        row("1b write floor, custom resource: Lock status CAS PUT", s);
    }
    if let Some(s) = &r.handover_floor {
        row("2 handover floor: DELETE -> watch -> CREATE (Lease)", s);
    }
    if let Some(s) = &r.handover_floor_again {
        row("2 handover floor (Lease), measured again after 3", s);
    }
    if let Some(s) = &r.cr_handover_floor {
        row("2b handover floor, custom resource (LockRequest)", s);
    }
    for (label, h) in &r.handovers {
        row(&format!("3 kubelock handover, {label}"), &h.samples);
    }
    if let Some(s) = &r.lease_polling {
        row("4 peer: Lease polling (client-go, 2 s retry, 2 waiting)", s);
    }
    if let Some(s) = &r.etcd_lock {
        row("5 peer: etcd lock API (unlock -> lock returns)", s);
    }
    if let Some(s) = &r.zookeeper_handover {
        row("9 peer: ZooKeeper lock (kazoo, release -> acquire)", s);
    }
    if !r.throughput.is_empty() {
        println!();
        println!("{:<56} {:>9} {:>9}", "throughput (hold time 0)", "grants", "grants/s");
        for (label, t) in &r.throughput {
            println!(
                "{:<56} {:>9} {:>9.1}",
                format!("6 {label}, {:.0} s", t.window.as_secs_f64()),
                t.grants,
                t.per_second()
            );
            if t.grants > 0 {
                let per: Vec<String> =
                    t.api_writes.iter().map(|(k, v)| format!("{k} {:.2}", v / t.grants as f64)).collect();
                println!("    API writes per grant: {:.2} ({})", t.writes_per_grant().unwrap_or(0.0), per.join(", "));
                let kinds: Vec<String> = t.per_grant_by_kind().iter().map(|(k, v)| format!("{k} {v:.2}")).collect();
                println!("    by kind: {}", kinds.join(", "));
                println!("    controller writes: {}", fmt_map(&t.controller_writes));
            }
        }
        if let Some((clients, grants, secs)) = r.zookeeper_throughput {
            println!(
                "{:<56} {:>9} {:>9.1}",
                format!("9 ZooKeeper: 1 lock x {clients} clients, {secs:.0} s"),
                grants,
                grants as f64 / secs
            );
        }
    }
    if let Some(s) = &r.scale {
        println!();
        println!(
            "7 scale: {} Locks + {} LockRequests created before the controller ({:.0} s to create)",
            s.locks, s.requests, s.create_s
        );
        let secs = |v: Option<f64>| v.map_or("not reached".to_string(), |v| format!("{v:.1} s"));
        println!("  controller ready (caches synced)      {}", secs(s.ready_s));
        let rate =
            s.all_held_s.or(s.gave_up_s).map_or(String::new(), |t| format!(", {:.0} locks/s", s.held as f64 / t));
        println!("  every lock held (all grants made)     {}   ({} / {}{rate})", secs(s.all_held_s), s.held, s.locks);
        println!(
            "  every request status mirrored         {}   ({} / {})",
            secs(s.all_mirrored_s),
            s.mirrored,
            s.requests
        );
        println!(
            "  controller peak RSS (VmHWM)           {:.0} MiB  (RSS after settle {:.0} MiB)",
            s.peak_rss_mib, s.rss_mib
        );
        println!("  controller CPU to settle              {:.1} s", s.cpu_s);
        println!(
            "  reconcile p50 / p99 (histogram)       {} / {}",
            s.reconcile_p50_ms.map_or("-".into(), |v| format!("{v:.1} ms")),
            s.reconcile_p99_ms.map_or("-".into(), |v| format!("{v:.1} ms"))
        );
        println!("  controller writes                     {}", fmt_map(&s.writes));
        println!("  API server writes until quiet         {}", fmt_map(&s.settle_api_writes));
        println!(
            "  API server quiet (no writes for 1 s)   {}",
            s.quiet_after_s.map_or("-".into(), |v| format!("{v:.1} s after the controller started"))
        );
        println!(
            "  idle {:.0} s: CPU {} of a core, {} reconciles, writes {}",
            s.idle_s,
            s.idle_cpu_per_s.map_or("-".into(), |v| format!("{:.3}%", v * 100.0)),
            s.idle_reconciles,
            fmt_map(&s.idle_writes)
        );
    }
    if let Some(x) = &r.renewal {
        println!();
        println!("8 renewal: {} holders renewing every {:.0} s, {:.0} s window", x.holders, x.period_s, x.window_s);
        println!("  API writes/s to kubelock objects      {:.1}   ({})", x.api_writes_per_s, fmt_map(&x.api_writes));
        println!("  controller writes                     {}", fmt_map(&x.controller_writes));
        println!(
            "  controller CPU                        {:.2}% of a core ({} above idle); {} reconciles; {} expirations",
            x.controller_cpu_per_s * 100.0,
            x.idle_cpu_per_s.map_or("-".into(), |i| format!("{:+.2}%", (x.controller_cpu_per_s - i) * 100.0)),
            x.reconciles,
            x.expirations
        );
    }
    if let Some(q) = &r.queue {
        println!();
        println!("10 long queue: {} requests on one Lock ({:.0} s to create)", q.queued, q.create_s);
        println!("  settled (API server quiet)            {:.1} s after the controller started", q.settle_s);
        println!("  API writes to settle                  {}", fmt_map(&q.settle_api_writes));
        println!(
            "  {} handovers in {:.1} s: API writes per grant {}   ({})",
            q.grants,
            q.window_s,
            q.writes_per_grant().map_or("-".into(), |v| format!("{v:.2}")),
            fmt_map(&q.api_writes)
        );
        println!("  controller writes                     {}", fmt_map(&q.controller_writes));
        println!("  controller peak RSS (VmHWM)           {:.0} MiB  (RSS {:.0} MiB)", q.peak_rss_mib, q.rss_mib);
    }
    println!();
    println!("per step: etcd WAL fsyncs (count, p50/p99 from etcd's histogram) and CPU seconds used by");
    println!("kube-apiserver (api), etcd, the controller (ctl) and this benchmark (bench):");
    for f in r.step_figures() {
        let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
        let (n, p50, p99) = f.fsync.unwrap_or((0.0, None, None));
        let cpu = |k: &str| f.cpu.get(k).map_or("-".into(), |v| format!("{v:.1}"));
        println!(
            "  {:<52} {:>5.0} s {:>6.0} fsyncs {:>5}/{:<5} ms  api {:>5}  etcd {:>5}  ctl {:>5}  bench {:>5}",
            f.label,
            f.secs,
            n,
            ms(p50),
            ms(p99),
            cpu("kube-apiserver"),
            cpu("etcd"),
            cpu("controller"),
            cpu("bench")
        );
    }
    let ratios = &report["ratios_p50"];
    println!();
    println!("ratios of p50s (kubelock = mutex, 2 waiting):");
    let fmt_ratio = |v: &Value| v.as_f64().map_or("-".into(), |v| format!("{v:.2}"));
    println!("  kubelock handover / handover floor      {}", fmt_ratio(&ratios["kubelock_mutex2_over_handover_floor"]));
    println!(
        "  kubelock handover / floor on CRs (2b)   {}",
        fmt_ratio(&ratios["kubelock_mutex2_over_custom_resource_handover_floor"])
    );
    println!("  Lease polling / kubelock handover       {}", fmt_ratio(&ratios["lease_polling_over_kubelock_mutex2"]));
    println!("  kubelock handover / etcd lock           {}", fmt_ratio(&ratios["kubelock_mutex2_over_etcd_lock"]));
    println!("  kubelock handover / ZooKeeper lock      {}", fmt_ratio(&ratios["kubelock_mutex2_over_zookeeper_lock"]));
    println!();
    println!("targets:");
    for (name, measured, goal, pass) in targets(r) {
        let verdict = match pass {
            Some(true) => "PASS",
            Some(false) => "MISS",
            None => "-",
        };
        println!("  {:<46} {:>20}  {:<18} {}", name, measured, goal, verdict);
    }
    for (item, e) in &r.errors {
        println!("FAILED {item}: {e}");
    }
}

fn fmt_map(m: &std::collections::BTreeMap<String, f64>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.iter().map(|(k, v)| format!("{k}={v:.0}")).collect::<Vec<_>>().join(", ")
}

/// A mutex handover with two waiters in namespace `bench` while `kubelock webhook` (run here,
/// on a loopback port, registered for that namespace alone) reviews its requests; the
/// webhook and its configurations are gone afterwards.
async fn webhook_handover(
    client: &kube::Client,
    locks: &Api<Lock>,
    requests: &Api<LockRequest>,
    out_dir: &std::path::Path,
    budget: Budget,
) -> anyhow::Result<handover::Handover> {
    use k8s_openapi::api::admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration};
    use kubelock::webhook::{self, WebhookArgs};
    const LABEL: (&str, &str) = ("kubelock.dev/bench-webhook", "on");
    const NAME: &str = "kubelock-bench";
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let label = |on: bool| {
        let value = if on { Value::from(LABEL.1) } else { Value::Null };
        kube::api::Patch::Merge(json!({"metadata": {"labels": {LABEL.0: value}}}))
    };
    namespaces.patch("bench", &Default::default(), &label(true)).await?;
    let mut args = WebhookArgs::local(out_dir.join("webhook"), NAME);
    args.namespace_label = Some((LABEL.0.into(), LABEL.1.into()));
    let listener = webhook::bind(&args.listen)?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(webhook::serve(client.clone(), args, listener, async move {
        let _ = stopped.await;
    }));
    let result = async {
        webhook::config::wait_enforced(client, "bench", Duration::from_secs(30)).await.map_err(anyhow::Error::msg)?;
        handover::handover(locks, requests, "h-webhook", 1, 2, budget).await
    }
    .await;
    // Unregistered before it stops: it fails closed, and the next items use this namespace.
    let _ = Api::<MutatingWebhookConfiguration>::all(client.clone()).delete(NAME, &Default::default()).await;
    let _ = Api::<ValidatingWebhookConfiguration>::all(client.clone()).delete(NAME, &Default::default()).await;
    namespaces.patch("bench", &Default::default(), &label(false)).await?;
    let _ = stop.send(());
    let _ = serving.await;
    result
}
