//! Fault runs on a real control plane, judged by the history checker
//! ([`crate::support::checker`]).
//!
//! Each run has a control plane of its own (it kills and restarts its servers), starts from
//! a seed (printed; `KUBELOCK_FAULT_SEED=N` replays the same schedule of faults and hold
//! times — the interleavings of processes still vary) and drives contenders through
//! acquire / act / release cycles while faults are injected:
//! - `controllers_crash_and_split_brain`: controllers SIGKILLed at random moments and
//!   restarted (at least 30 kills), in phases of one, two and three controllers at once with
//!   no leader election; in-process contenders on a mutex, a semaphore and a read/write lock.
//! - `control_plane_outages_frozen_and_skewed_holders`: kube-apiserver killed and restarted
//!   while requests queue, etcd killed and restarted, `kubelock run` holders frozen (SIGSTOP)
//!   past their lease and thawed, an in-process holder whose runtime stalls past its lease, a
//!   holder that renews with its wall clock an hour ahead and an hour behind, controller kills.
//! - `grants_ended_by_others_while_holders_act`: holders' requests deleted by another party,
//!   holders broken, granted requests re-pointed, Locks deleted and recreated, holders' pods
//!   deleted (gracefully, by force) or reported stopped, while in-process contenders and
//!   `kubelock run` holders (whose commands trap SIGTERM and keep acting) hold.
//! - `a_burst_of_requests_is_granted_in_order`: 1,000 requests on one mutex
//!   (`KUBELOCK_FAULT_BURST`), each released as soon as it is granted, while the controller is
//!   killed now and then: every one is granted exactly once, in FIFO order.
//!
//! `KUBELOCK_FAULT_SECONDS` sets the workload time of the first two (default 40 s);
//! `KUBELOCK_FAULT_REPORT=FILE` appends one summary line per run (used by `make chaos`).
//! Only one fault run holds a control plane at a time (they would starve each other on a
//! small machine); other tests run meanwhile.
//!
//! Also here: `malformed_objects_get_a_condition_and_others_keep_being_served` (objects that
//! do not match the Rust types) and `run_actor` (the command of the `kubelock run` holders).

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures::{StreamExt as _, future::join_all};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::{
    Api, ResourceExt as _,
    api::{DeleteParams, ListParams, Patch, PatchParams, Preconditions},
    runtime::{WatchStreamExt as _, watcher},
};
use kubelock::{
    api::{Lock, LockRequest, Phase, PodRef},
    client::{AcquireOptions, BootInstant, LockClient, LockState, default_margin},
};
use rand::{RngExt as _, SeedableRng as _, rngs::StdRng};
use rustix::process::{Pid, Signal};
use tokio::sync::Semaphore;

use crate::support::{
    Cmd, Identity, Proc, ServerFaults as _, TIMEOUT, TestEnv,
    checker::{self, At, Bounds, FaultKind, History, Journal, Report, Summary},
    eventually,
    fixtures::{
        ControllerCmd, Fixture, controller_rules, create_lock, create_request, free_port, lock_with, requester_rules,
        wait_ready,
    },
    wait_until,
};

/// One fault run at a time holds a control plane.
static ONE_AT_A_TIME: Semaphore = Semaphore::const_new(1);

/// Time between a holder's steps ("work" done while holding).
const STEP: Duration = Duration::from_millis(20);

/// The seed of a run: `KUBELOCK_FAULT_SEED`, or random; printed either way. Returns the
/// printed seed and the run's own stream drawn from it.
fn seed_for(test: &str) -> (u64, u64) {
    let base: u64 = match std::env::var("KUBELOCK_FAULT_SEED") {
        Ok(s) => s.trim().parse().unwrap_or_else(|_| panic!("KUBELOCK_FAULT_SEED={s:?} is not a number")),
        Err(_) => rand::random::<u64>() % 1_000_000_000,
    };
    println!("fault run {test}: seed {base} (replay: KUBELOCK_FAULT_SEED={base})");
    // One seed replays every run; each run draws its own stream from it.
    (base, test.bytes().fold(base, |h, b| h.wrapping_mul(0x100_0000_01b3).wrapping_add(u64::from(b))))
}

fn workload_time() -> Duration {
    let secs = std::env::var("KUBELOCK_FAULT_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(40u64);
    Duration::from_secs(secs)
}

fn ms(rng: &mut StdRng, lo: u64, hi: u64) -> Duration {
    Duration::from_millis(rng.random_range(lo..=hi))
}

/// A run: a private control plane, the recorder, the controllers.
struct FaultRun {
    name: &'static str,
    /// The seed to replay with (`KUBELOCK_FAULT_SEED`).
    printed: u64,
    /// The run's own random stream.
    seed: u64,
    env: TestEnv,
    history: History,
    journal: Journal,
    locks: Api<Lock>,
    controllers: Vec<(String, Proc)>,
    controller_logs: Vec<(String, PathBuf)>,
    started: Instant,
    rng: StdRng,
    _turn: tokio::sync::SemaphorePermit<'static>,
}

impl FaultRun {
    async fn start(name: &'static str) -> FaultRun {
        let turn = ONE_AT_A_TIME.acquire().await.expect("the semaphore is never closed");
        let (printed, seed) = seed_for(name);
        let env = TestEnv::private().await;
        env.grant(Identity::Controller, controller_rules()).await;
        env.grant(Identity::Requester1, requester_rules()).await;
        let history = History::record(env.control_plane().etcd_endpoint(), env.ns()).await;
        let journal = history.journal.clone();
        let locks = env.api(Identity::Admin).await;
        FaultRun {
            name,
            printed,
            seed,
            env,
            history,
            journal,
            locks,
            controllers: Vec::new(),
            controller_logs: Vec::new(),
            started: Instant::now(),
            rng: StdRng::seed_from_u64(seed),
            _turn: turn,
        }
    }

    async fn lock(&self, name: &str, permits: i32, lease: &str, delay: &str) {
        create_lock(&self.locks, lock_with(name, permits, lease, delay)).await;
    }

    /// A controller process (`controller-N`), as the least-privileged controller identity
    /// (its logs are left out of the namespace dump: [`FaultRun::dump_controllers`] prints the
    /// last ones). Its `/readyz` is polled in the background: the moment its caches are synced
    /// is journaled (the checker counts start-up time until then).
    fn start_controller(&mut self) {
        let name = format!("controller-{}", self.controller_logs.len());
        let port = free_port();
        let proc = ControllerCmd::new(&self.env, Identity::Controller, &name)
            .pod_name()
            .log("info")
            .admin_port(port)
            .undumped()
            .spawn();
        self.journal.fault(FaultKind::ControllerStart, checker::now(), None, &name);
        let (journal, who) = (self.journal.clone(), name.clone());
        tokio::spawn(async move {
            if wait_ready(port, Duration::from_secs(120)).await {
                journal.fault(FaultKind::ControllerReady, checker::now(), None, &who);
            }
        });
        self.controller_logs.push((name.clone(), self.env.log_dir().join(format!("{name}.stderr"))));
        self.controllers.push((name, proc));
    }

    /// SIGKILLs the `i`-th running controller.
    fn kill_controller(&mut self, i: usize) {
        let (name, mut proc) = self.controllers.remove(i);
        proc.kill();
        self.journal.fault(FaultKind::ControllerKill, checker::now(), None, &name);
    }

    fn kills(&self) -> usize {
        self.journal.snapshot().faults.iter().filter(|f| f.kind == FaultKind::ControllerKill).count()
    }

    async fn requester(&self) -> LockClient {
        LockClient::new(self.env.client(Identity::Requester1).await, self.env.ns())
    }

    /// Ends the run: one controller left to finish the work, every request released or
    /// finished, the recorder caught up; then the checker judges the whole history.
    async fn finish(self) -> Summary {
        self.finish_with(true).await
    }

    /// [`FaultRun::finish`]; `settle`: wait for every request to be released or finished first.
    async fn finish_with(mut self, settle: bool) -> Summary {
        if self.controllers.is_empty() {
            self.start_controller();
        }
        while self.controllers.len() > 1 {
            let (_, mut p) = self.controllers.remove(0);
            p.kill();
        }
        let requests: Api<LockRequest> = self.env.api(Identity::Admin).await;
        let settled = eventually("every request released or finished", Duration::from_secs(120), || async {
            if !settle {
                return Ok(());
            }
            let list = requests.list(&ListParams::default()).await.map_err(|e| e.to_string())?;
            let open: Vec<String> = list
                .items
                .iter()
                .filter(|r| !r.phase().is_final())
                .map(|r| format!("{} {}", r.name_any(), r.phase()))
                .collect();
            if open.is_empty() { Ok(()) } else { Err(format!("still open: {open:?}")) }
        })
        .await;
        assert!(self.history.sync(Duration::from_secs(30)).await, "the recorder did not catch up with etcd");
        let mut log = self.journal.snapshot();
        log.end = Some(checker::now());
        let result = checker::check(&log, &Bounds::default());
        let elapsed = self.started.elapsed();
        let (summary, violations) = match &result {
            Ok(s) => (s.clone(), 0),
            Err(f) => (f.summary.clone(), f.violations.len()),
        };
        report_line(self.name, self.printed, &summary, violations, elapsed);
        println!("fault run {}: {:.0}s, {summary}", self.name, elapsed.as_secs_f64());
        if let Err(failure) = result {
            self.dump_controllers();
            panic!("fault run {} (KUBELOCK_FAULT_SEED={}): {failure}", self.name, self.printed);
        }
        if let Err(e) = settled {
            self.dump_controllers();
            panic!("fault run {}: {e}", self.name);
        }
        summary
    }

    /// With `KUBELOCK_FAULT_LOGS=DIR`, copies every process log of the run to `DIR/<run>-<seed>/`.
    fn keep_logs(&self) {
        let Some(dir) = std::env::var_os("KUBELOCK_FAULT_LOGS") else { return };
        let to = Path::new(&dir).join(format!("{}-{}", self.name, self.printed));
        let _ = std::fs::create_dir_all(&to);
        for entry in std::fs::read_dir(self.env.log_dir()).into_iter().flatten().flatten() {
            let _ = std::fs::copy(entry.path(), to.join(entry.file_name()));
        }
        let _ = std::fs::copy(
            self.env.control_plane().log_file(crate::support::Component::ApiServer),
            to.join("kube-apiserver.log"),
        );
        println!("fault run {}: logs kept in {}", self.name, to.display());
    }

    fn dump_controllers(&self) {
        for (name, path) in self.controller_logs.iter().rev().take(3) {
            eprintln!("--- {name} ({}), last lines:\n{}", path.display(), kubelock::devenv::log_tail(path, 40));
        }
    }
}

impl Drop for FaultRun {
    fn drop(&mut self) {
        self.keep_logs();
    }
}

/// Appends the run's summary to `KUBELOCK_FAULT_REPORT` (one line, `key=value` fields).
fn report_line(name: &str, seed: u64, s: &Summary, violations: usize, elapsed: Duration) {
    let Some(path) = std::env::var_os("KUBELOCK_FAULT_REPORT") else { return };
    let faults: Vec<String> = s.faults.iter().map(|(k, n)| format!("{k}:{n}")).collect();
    let line = format!(
        "run={name} seed={seed} violations={violations} grants={} expiries={} drained={} revisions={} fifo_pairs={} acted={} steps={} longest_stall_ms={} seconds={} faults={}\n",
        s.grants,
        s.expiries,
        s.drained,
        s.records,
        s.fifo_pairs,
        s.acted,
        s.steps,
        s.longest_stall.as_millis(),
        elapsed.as_secs(),
        faults.join(",")
    );
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).expect("opening the report file");
    f.write_all(line.as_bytes()).expect("writing the report file");
}

// ---------------------------------------------------------------------------------------
// Contenders.

/// What one contender does.
#[derive(Clone)]
pub(crate) struct Work {
    pub(crate) lock: String,
    pub(crate) permits: i32,
    pub(crate) lease: Duration,
    /// Hold time range, ms.
    pub(crate) hold: (u64, u64),
    pub(crate) stop: At,
    pub(crate) journal: Journal,
}

#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) grants: usize,
    pub(crate) errors: usize,
    /// The first errors, for failure messages.
    pub(crate) first_errors: Vec<String>,
    pub(crate) lost: usize,
    /// `kubelock run` commands that trapped their SIGTERM and kept acting until killed.
    pub(crate) trapped: usize,
    pub(crate) problems: Vec<String>,
}

/// Stalls the thread of a runtime once, the next time its contender holds.
pub(crate) struct Stall {
    armed: AtomicBool,
    length: Duration,
}

/// A contender bound to pods: every cycle runs "in" a new pod object, bound to a node that no
/// kubelet runs (so nothing but the fault schedule reports it stopped), and acquires with its
/// `podRef`. The schedule deletes that pod (gracefully or by force), or stops it: it asks the
/// contender to stop acting, waits until it did, then writes `Failed` into the pod's status
/// as a kubelet would. The contender goes on past the stop while `owed` counts pod faults
/// still to make.
pub(crate) struct PodBound {
    pods: Api<Pod>,
    stop: AtomicBool,
    stopped: AtomicBool,
    owed: Arc<AtomicUsize>,
}

impl PodBound {
    /// A pod object on the node no kubelet runs.
    async fn create(&self, name: &str) -> Result<PodRef, kube::Error> {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"nodeName": "no-kubelet", "containers": [{"name": "app", "image": "app"}]},
        }))
        .expect("a pod");
        let pod = self.pods.create(&Default::default(), &pod).await?;
        Ok(PodRef { name: name.into(), uid: pod.uid() })
    }

    /// Stops the contender acting in its pod (as its container stopping would), then reports
    /// the pod Failed. False if the contender did not stop in time (it was not holding).
    async fn stop_and_report(&self, pod: &str) -> Result<bool, kube::Error> {
        self.stopped.store(false, Ordering::SeqCst);
        self.stop.store(true, Ordering::SeqCst);
        let acted = eventually("the contender to stop acting", Duration::from_secs(5), || async {
            if self.stopped.load(Ordering::SeqCst) { Ok(()) } else { Err("still acting".to_string()) }
        })
        .await;
        if acted.is_err() {
            self.stop.store(false, Ordering::SeqCst);
            return Ok(false);
        }
        let status = serde_json::json!({"status": {"phase": "Failed"}});
        self.pods.patch_status(pod, &PatchParams::default(), &Patch::Merge(&status)).await?;
        Ok(true)
    }
}

/// Acquire, act in steps while the client says it holds (its published state, deadline
/// checked against a fresh clock reading at every step), release; until `w.stop`.
pub(crate) async fn contend(client: LockClient, who: String, w: Work, seed: u64, stall: Option<Arc<Stall>>) -> Stats {
    contend_in_pods(client, who, w, seed, stall, None).await
}

/// [`contend`], each cycle in a pod of its own if `pods` is given.
async fn contend_in_pods(
    client: LockClient,
    who: String,
    w: Work,
    seed: u64,
    stall: Option<Arc<Stall>>,
    pods: Option<Arc<PodBound>>,
) -> Stats {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut stats = Stats::default();
    let note = |text: String| w.journal.report(Report::Note { at: checker::now(), who: who.clone(), text });
    let overtime = w.stop + Duration::from_secs(60);
    let owed = || pods.as_ref().is_some_and(|p| p.owed.load(Ordering::SeqCst) > 0);
    let mut cycle = 0;
    while checker::now() < w.stop || (owed() && checker::now() < overtime) {
        let mut opts = AcquireOptions::new(&w.lock);
        opts.permits = w.permits;
        opts.lease = Some(w.lease);
        opts.holder_identity = who.clone();
        opts.wait_timeout = Some(Duration::from_secs(90));
        cycle += 1;
        if let Some(p) = &pods {
            p.stop.store(false, Ordering::SeqCst);
            match p.create(&format!("{who}-{cycle}")).await {
                Ok(pod_ref) => opts.pod_ref = Some(pod_ref),
                Err(e) => {
                    note(format!("creating its pod failed: {e}"));
                    tokio::time::sleep(ms(&mut rng, 100, 500)).await; // back off, then try again
                    continue;
                }
            }
        }
        let guard = match client.acquire(opts).await {
            Ok(g) => g,
            Err(e) => {
                stats.errors += 1;
                if stats.first_errors.len() < 5 {
                    stats.first_errors.push(format!("{:.3}s {e}", checker::now().as_secs_f64()));
                }
                note(format!("acquire failed: {e}"));
                tokio::time::sleep(ms(&mut rng, 100, 500)).await; // back off, then try again
                continue;
            }
        };
        stats.grants += 1;
        let token = guard.token();
        w.journal.report(Report::Granted {
            at: checker::now(),
            who: who.clone(),
            lock: w.lock.clone(),
            request: guard.request_name().into(),
            token,
        });
        let hold = ms(&mut rng, w.hold.0, w.hold.1);
        let began = Instant::now();
        let (mut first, mut last, mut steps, mut not_before) = (None, None, 0u64, None);
        let state = guard.state();
        loop {
            if let Some(s) = &stall
                && s.armed.swap(false, Ordering::SeqCst)
            {
                // The whole runtime stops: no renewal, no watch event, no timer (a GC pause).
                let at = checker::now();
                w.journal.fault(FaultKind::RuntimePause, at, None, &who);
                std::thread::sleep(s.length);
                w.journal.fault_ended(FaultKind::RuntimePause, &who, checker::now());
            }
            let t = BootInstant::now();
            let holding = match &*state.borrow() {
                LockState::Holding { deadline, lease, .. } if t < *deadline => Some((*deadline, *lease)),
                _ => None,
            };
            let Some((deadline, lease)) = holding else { break };
            if let Some(p) = &pods
                && p.stop.load(Ordering::SeqCst)
            {
                p.stopped.store(true, Ordering::SeqCst);
                break; // its pod's container stopped
            }
            first.get_or_insert(t.since_boot());
            last = Some(t.since_boot());
            steps += 1;
            // The boot time before the last successful renewal + lease: no expiry before it.
            not_before = Some(deadline.saturating_add(default_margin(lease)).since_boot());
            if began.elapsed() >= hold {
                break;
            }
            tokio::time::sleep(STEP).await; // the work done while holding
        }
        if let (Some(from), Some(to)) = (first, last) {
            w.journal.report(Report::Acted {
                who: who.clone(),
                lock: w.lock.clone(),
                request: guard.request_name().into(),
                token,
                permits: i64::from(w.permits),
                from,
                to,
                steps,
            });
        }
        if let Some(at) = not_before {
            w.journal.report(Report::NotBefore { lock: w.lock.clone(), token, at });
        }
        if !guard.is_holding() {
            stats.lost += 1;
            note(format!("token {token}: {:?}", guard.current()));
        }
        if let Err(e) = guard.release().await {
            note(format!("release of token {token} failed: {e}"));
        }
        if let Some(p) = &pods {
            // Done with this cycle's pod (it may be gone already, or be terminating).
            let name = format!("{who}-{cycle}");
            let _ = p.pods.delete(&name, &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await;
        }
        tokio::time::sleep(ms(&mut rng, 0, 100)).await; // between cycles
    }
    stats
}

/// A contender on a thread and runtime of its own (so that its runtime can be stalled).
fn contend_on_own_thread(
    config: kube::Config,
    ns: String,
    who: String,
    w: Work,
    seed: u64,
    stall: Arc<Stall>,
) -> tokio::task::JoinHandle<Stats> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        let stats = runtime.block_on(async move {
            let client = kubelock::connect::client_from_config(config).expect("a client");
            contend(LockClient::new(client, ns), who, w, seed, Some(stall)).await
        });
        let _ = tx.send(stats);
    });
    tokio::spawn(async move {
        rx.await.unwrap_or_else(|_| Stats { problems: vec!["thread died".into()], ..Default::default() })
    })
}

// ---------------------------------------------------------------------------------------
// `kubelock run` holders: the command is this test binary, re-executed as `run_actor`.

/// What a `kubelock run` command recorded.
#[derive(Debug, Default)]
struct ActorLog {
    pid: Option<u32>,
    lock: String,
    request: String,
    token: i64,
    first: Option<At>,
    last: Option<At>,
    steps: u64,
    /// When its SIGTERM came (a trapping actor), and the steps it took after it.
    term: Option<At>,
    steps_after_term: u64,
}

fn read_actor_log(path: &Path) -> ActorLog {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut log = ActorLog::default();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["start", pid, lock, request, token] => {
                log.pid = pid.parse().ok();
                log.lock = lock.to_string();
                log.request = request.to_string();
                log.token = token.parse().unwrap_or(-1);
            }
            ["step", nanos] => {
                if let Ok(n) = nanos.parse::<u64>() {
                    let t = Duration::from_nanos(n);
                    log.first.get_or_insert(t);
                    log.last = Some(t);
                    log.steps += 1;
                    log.steps_after_term += u64::from(log.term.is_some());
                }
            }
            ["term", nanos] => log.term = nanos.parse::<u64>().ok().map(Duration::from_nanos),
            _ => {}
        }
    }
    log
}

/// The command of a `kubelock run` holder: records its grant and a step every 20 ms on
/// `CLOCK_BOOTTIME` (`start PID LOCK REQUEST TOKEN`, `step NANOS`), for `hold`. It never looks
/// at the lock: stopping it on a loss is `kubelock run`'s job. With `trap_term`, it traps
/// SIGTERM (`term NANOS`) and keeps acting until it is killed, as a command that drains its
/// work on SIGTERM may.
fn actor(path: &Path, hold: Duration, trap_term: bool) {
    let term = Arc::new(AtomicBool::new(false));
    if trap_term {
        signal_hook::flag::register(signal_hook::consts::SIGTERM, term.clone()).expect("trapping SIGTERM");
    }
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("opening the actor log");
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| "-".into());
    let start = format!(
        "start {} {} {} {}\n",
        std::process::id(),
        var("KUBELOCK_LOCK"),
        var("KUBELOCK_REQUEST"),
        var("KUBELOCK_TOKEN")
    );
    file.write_all(start.as_bytes()).expect("writing the actor log");
    let began = checker::now();
    let mut termed = false;
    loop {
        if !termed && term.load(Ordering::SeqCst) {
            termed = true;
            file.write_all(format!("term {}\n", checker::now().as_nanos()).as_bytes()).expect("writing the actor log");
        }
        let t = checker::now();
        file.write_all(format!("step {}\n", t.as_nanos()).as_bytes()).expect("writing the actor log");
        // Told to stop, it goes on (until SIGKILL; a bound in case that never comes).
        if t - began >= hold && !(termed && t - began < hold + Duration::from_secs(60)) {
            break;
        }
        std::thread::sleep(STEP);
    }
}

/// When run by `kubelock run` (`KUBELOCK_FAULT_ACTOR` set) this is a holder's command;
/// otherwise it checks that the command records what the checker reads.
#[test]
fn run_actor() {
    if let Some(path) = std::env::var_os("KUBELOCK_FAULT_ACTOR") {
        let hold = std::env::var("KUBELOCK_FAULT_HOLD_MS").ok().and_then(|s| s.parse().ok()).unwrap_or(500);
        let trap = std::env::var_os("KUBELOCK_FAULT_TRAP_TERM").is_some();
        actor(Path::new(&path), Duration::from_millis(hold), trap);
        return;
    }
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("actor");
    let before = checker::now();
    actor(&path, Duration::from_millis(100), false);
    let log = read_actor_log(&path);
    assert_eq!(log.pid, Some(std::process::id()));
    assert!(log.steps >= 5, "{log:?}");
    let (first, last) = (log.first.unwrap(), log.last.unwrap());
    assert!(before <= first && first < last && last <= checker::now(), "{log:?}");
    assert!(last - first >= Duration::from_millis(100));
}

/// A process's pending signals include SIGTERM, or it is gone.
fn term_pending_or_gone(pid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return true };
    let term = 1u64 << (15 - 1);
    status.lines().any(|l| {
        let (key, value) = l.split_once(':').unwrap_or_default();
        match key {
            "SigPnd" | "ShdPnd" => u64::from_str_radix(value.trim(), 16).is_ok_and(|m| m & term != 0),
            "State" => value.trim().starts_with('Z'),
            _ => false,
        }
    })
}

/// A loop of `kubelock run` holders on one lock; `freeze` asks it to freeze the next one
/// (wrapper and command) past its lease, then thaw the wrapper first and the command once the
/// wrapper has signalled it. With `trap` their commands trap SIGTERM and keep acting until
/// killed; the loop goes on past the stop while `trap` counts commands still owed that were
/// stopped so (each one counts it down).
#[allow(clippy::too_many_arguments)]
async fn run_holders(
    env_dir: PathBuf,
    kubeconfig: PathBuf,
    ns: String,
    who: String,
    w: Work,
    seed: u64,
    freeze: Arc<AtomicUsize>,
    freeze_for: Duration,
    trap: Option<Arc<AtomicUsize>>,
) -> Stats {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut stats = Stats::default();
    let exe = std::env::current_exe().expect("the test binary");
    let mut n = 0;
    // Past the stop while a freeze asked for has not happened yet (a slow machine), for a while.
    let overtime = w.stop + Duration::from_secs(60);
    let owed = || freeze.load(Ordering::SeqCst) > 0 || trap.as_ref().is_some_and(|t| t.load(Ordering::SeqCst) > 0);
    while checker::now() < w.stop || (owed() && checker::now() < overtime) {
        n += 1;
        let name = format!("{who}-{n}");
        let file = env_dir.join(format!("{name}.actor"));
        let hold = ms(&mut rng, w.hold.0, w.hold.1);
        // A grace that fits the lease (`kubelock run` refuses one that does not).
        let grace = kubelock::client::grace::default_grace(w.lease, default_margin(w.lease));
        let cmd = Cmd::kubelock(&name, &env_dir)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["-n", &ns, "--request-timeout", "5s"])
            .env_remove("KUBECONFIG")
            .args(["run", "--lock", &w.lock, "--holder", &who, "--process-group", "own", "--grace"])
            .arg(kubelock::api::duration::format(grace))
            .args(["--lease", &kubelock::api::duration::format(w.lease), "--wait-timeout", "90s", "--"])
            .arg(&exe)
            .args(["faults::run_actor", "--exact", "--nocapture", "--test-threads", "1", "-q"])
            .env("KUBELOCK_FAULT_ACTOR", &file)
            .env("KUBELOCK_FAULT_HOLD_MS", hold.as_millis().to_string());
        let mut proc = if trap.is_some() { cmd.env("KUBELOCK_FAULT_TRAP_TERM", "1") } else { cmd }.spawn();
        let mut froze = false;
        if freeze.load(Ordering::SeqCst) > 0 {
            // Wait for the command to run (the grant), then freeze both mid-hold.
            // Not while the wrapper is failing (the API server may be down or, restarting, not
            // authorize yet): a cycle whose wrapper exits leaves the freeze to the next one.
            let give_up = Instant::now() + Duration::from_secs(60);
            let started = loop {
                if let Some(pid) = read_actor_log(&file).pid {
                    break Some(pid);
                }
                if proc.try_status().is_some() || Instant::now() >= give_up {
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(20)).await; // polling the command's log, with a deadline
            };
            if let Some(child) = started
                && freeze.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
            {
                froze = true;
                tokio::time::sleep(ms(&mut rng, 0, 200)).await; // somewhere in its hold
                let wrapper = Pid::from_raw(proc.pid() as i32).expect("a pid");
                let group = Pid::from_raw(child as i32).expect("a pid");
                let at = checker::now();
                let _ = rustix::process::kill_process(wrapper, Signal::STOP);
                let _ = rustix::process::kill_process_group(group, Signal::STOP);
                w.journal.fault(FaultKind::HolderFreeze, at, None, &name);
                tokio::time::sleep(freeze_for).await; // frozen past the lease
                let _ = rustix::process::kill_process(wrapper, Signal::CONT);
                let reacted =
                    eventually("kubelock run to stop its command after the thaw", Duration::from_secs(3), || async {
                        if term_pending_or_gone(child) { Ok(()) } else { Err("no SIGTERM pending".to_string()) }
                    })
                    .await;
                let _ = rustix::process::kill_process_group(group, Signal::CONT);
                w.journal.fault_ended(FaultKind::HolderFreeze, &name, checker::now());
                if let Err(e) = reacted {
                    stats.problems.push(format!("{name}: {e}"));
                }
            }
        }
        let status = proc.wait(Duration::from_secs(180)).await;
        let code = status.and_then(|s| s.code());
        let log = read_actor_log(&file);
        if let (Some(from), Some(to)) = (log.first, log.last) {
            stats.grants += 1;
            w.journal.report(Report::Granted {
                at: from,
                who: name.clone(),
                lock: log.lock.clone(),
                request: log.request.clone(),
                token: log.token,
            });
            w.journal.report(Report::Acted {
                who: name.clone(),
                lock: log.lock.clone(),
                request: log.request.clone(),
                token: log.token,
                permits: 1,
                from,
                to,
                steps: log.steps,
            });
        }
        match (froze, code) {
            (true, Some(75)) => stats.lost += 1,
            (true, other) => stats.problems.push(format!(
                "{name} was frozen past its lease but exited with {other:?}, not 75:\n{}",
                proc.stderr_tail(10)
            )),
            (false, Some(0)) => {}
            (false, Some(75)) if log.term.is_some() => {
                // Its grant ended while it acted (a break, a delete by someone else): stopped.
                stats.lost += 1;
                if log.steps_after_term > 0 {
                    stats.trapped += 1;
                    if let Some(t) = &trap {
                        let _ = t.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
                    }
                }
            }
            (false, other) => {
                stats.errors += 1;
                w.journal.report(Report::Note {
                    at: checker::now(),
                    who: name.clone(),
                    text: format!("exited with {other:?}: {}", proc.stderr_tail(2).replace('\n', " | ")),
                });
                tokio::time::sleep(ms(&mut rng, 200, 600)).await; // back off (the API server may be down)
            }
        }
        tokio::time::sleep(ms(&mut rng, 0, 100)).await;
    }
    stats
}

/// The notes a contender left in the journal (for failure messages).
fn notes_of(journal: &Journal, who: &str) -> Vec<String> {
    let log = journal.snapshot();
    log.reports
        .iter()
        .filter_map(|r| match r {
            Report::Note { at, who: w, text } if w == who => Some(format!("{:.3}s {text}", at.as_secs_f64())),
            _ => None,
        })
        .collect()
}

fn total(stats: &[Stats]) -> Stats {
    let mut t = Stats::default();
    for s in stats {
        t.grants += s.grants;
        t.errors += s.errors;
        t.lost += s.lost;
        t.trapped += s.trapped;
        t.problems.extend(s.problems.iter().cloned());
    }
    t
}

// ---------------------------------------------------------------------------------------
// The runs.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn controllers_crash_and_split_brain() {
    let mut run = FaultRun::start("controllers_crash_and_split_brain").await;
    // 30s leases: a lost wake-up would wait for the lease timer, far beyond the progress bound.
    run.lock("mutex", 1, "30s", "0s").await;
    run.lock("pool", 3, "30s", "0s").await;
    run.lock("rw", 3, "30s", "0s").await;
    run.start_controller();
    let stop = checker::now() + workload_time();
    let work = |lock: &str, permits: i32| Work {
        lock: lock.into(),
        permits,
        lease: Duration::from_secs(30),
        hold: (10, 200),
        stop,
        journal: run.journal.clone(),
    };
    let plan = [("mutex", 1), ("mutex", 1), ("mutex", 1), ("mutex", 1), ("mutex", 1)]
        .into_iter()
        .chain([("pool", 1); 4])
        .chain([("rw", 1), ("rw", 1), ("rw", 1), ("rw", 3)]);
    let mut tasks = Vec::new();
    for (i, (lock, permits)) in plan.enumerate() {
        let client = run.requester().await;
        tasks.push(tokio::spawn(contend(
            client,
            format!("{lock}-{i}"),
            work(lock, permits),
            run.seed + i as u64,
            None,
        )));
    }

    // Phases of one, two or three controllers; within each, kill one at random moments and
    // start a replacement after a short gap.
    let mut phase_end = Instant::now();
    let mut target = 1;
    while checker::now() < stop || run.kills() < 30 {
        if Instant::now() >= phase_end {
            target = [1, 2, 2, 3][run.rng.random_range(0..4usize)];
            phase_end = Instant::now() + ms(&mut run.rng, 4000, 8000);
            if target > 1 {
                run.journal.fault(FaultKind::SplitBrain, checker::now(), None, format!("{target} controllers"));
            }
        }
        while run.controllers.len() < target {
            run.start_controller();
        }
        while run.controllers.len() > target {
            let i = run.rng.random_range(0..run.controllers.len());
            run.kill_controller(i);
        }
        let gap = ms(&mut run.rng, 300, 3000);
        tokio::time::sleep(gap).await; // the fault schedule
        let i = run.rng.random_range(0..run.controllers.len());
        run.kill_controller(i);
        let restart = ms(&mut run.rng, 0, 500);
        tokio::time::sleep(restart).await;
        run.start_controller();
    }
    let stats: Vec<Stats> = join_all(tasks).await.into_iter().map(|r| r.expect("a contender panicked")).collect();
    let all = total(&stats);
    let kills = run.kills();
    let summary = run.finish().await;
    println!("contenders: {} grants, {} lost, {} errors", all.grants, all.lost, all.errors);
    assert!(kills >= 30, "only {kills} controller kills");
    for (i, s) in stats.iter().enumerate() {
        assert!(s.grants > 0, "contender {i} was never granted: {s:?}");
    }
    assert!(all.problems.is_empty(), "{:?}", all.problems);
    assert!(summary.grants >= all.grants, "{summary}");
}

/// Grants ended by others while their holders act: another party deletes a holder's
/// request, breaks it (the annotations `kubelock break` writes), re-points it at another
/// Lock, and a Lock is deleted and created again. Leases are 4 s and holds up to 3 s, so
/// that a holder is often mid-hold when its grant ends and the handover must wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grants_ended_by_others_while_holders_act() {
    let mut run = FaultRun::start("grants_ended_by_others_while_holders_act").await;
    run.lock("mutex", 1, "4s", "0s").await;
    run.lock("pool", 2, "4s", "0s").await;
    run.lock("elsewhere", 1, "4s", "0s").await;
    run.start_controller();
    let stop = checker::now() + workload_time();
    let work = |lock: &str| Work {
        lock: lock.into(),
        permits: 1,
        lease: Duration::from_secs(4),
        hold: (200, 3000),
        stop,
        journal: run.journal.clone(),
    };
    let mut tasks = Vec::new();
    for (i, lock) in ["mutex", "mutex", "mutex", "pool", "pool", "pool"].into_iter().enumerate() {
        let client = run.requester().await;
        tasks.push(tokio::spawn(contend(client, format!("{lock}-{i}"), work(lock), run.seed + i as u64, None)));
    }
    // `kubelock run` holders whose commands trap SIGTERM and keep acting until killed: a grant
    // ended by someone else must still stop them before the next holder acts. The schedule
    // goes on until one was stopped so.
    let owed = Arc::new(AtomicUsize::new(1));
    for i in 0..2 {
        tasks.push(tokio::spawn(run_holders(
            run.env.log_dir().to_path_buf(),
            run.env.kubeconfig(Identity::Requester1),
            run.env.ns().into(),
            format!("run-{i}"),
            work("mutex"),
            run.seed + 40 + i,
            Arc::new(AtomicUsize::new(0)),
            Duration::ZERO,
            Some(owed.clone()),
        )));
    }
    let overtime = stop + Duration::from_secs(60);
    let admin = run.env.admin().await;
    let requests: Api<LockRequest> = Api::namespaced(admin.clone(), run.env.ns());
    // Contenders bound to pods on the pool, whose pods the schedule deletes or stops.
    let pod_kinds = [FaultKind::PodDelete, FaultKind::PodForceDelete, FaultKind::PodStopped];
    let pod_owed = Arc::new(AtomicUsize::new(pod_kinds.len()));
    let mut bound = std::collections::BTreeMap::new();
    for i in 0..2 {
        let who = format!("pod-{i}");
        let p = Arc::new(PodBound {
            pods: Api::namespaced(admin.clone(), run.env.ns()),
            stop: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            owed: pod_owed.clone(),
        });
        bound.insert(who.clone(), p.clone());
        let client = run.requester().await;
        tasks.push(tokio::spawn(contend_in_pods(client, who, work("pool"), run.seed + 50 + i, None, Some(p))));
    }
    let pods: Api<Pod> = Api::namespaced(admin, run.env.ns());
    let kinds = [
        FaultKind::OthersDelete,
        FaultKind::Break,
        FaultKind::Repoint,
        FaultKind::LockRecreate,
        FaultKind::PodDelete,
        FaultKind::PodForceDelete,
        FaultKind::PodStopped,
    ];
    let mut done: std::collections::BTreeMap<&'static str, usize> = Default::default();
    let mut turn = 0usize;
    while checker::now() < stop
        || ((kinds.iter().any(|k| !done.contains_key(k.name())) || owed.load(Ordering::SeqCst) > 0)
            && checker::now() < overtime)
    {
        tokio::time::sleep(ms(&mut run.rng, 500, 2000)).await; // the fault schedule
        // Every kind in turn first, then at random.
        let kind = if turn < kinds.len() { kinds[turn] } else { kinds[run.rng.random_range(0..kinds.len())] };
        turn += 1;
        let on_pod = pod_kinds.contains(&kind);
        let lock_name = if on_pod || run.rng.random_bool(0.5) { "pool" } else { "mutex" };
        if kind == FaultKind::LockRecreate {
            let Ok(old) = run.locks.get(lock_name).await else { continue };
            // Any Lock, whatever its grants: deleted, it drains them in its own status (its
            // finalizer keeps it until then), and only then goes and may be made again.
            let at = checker::now();
            let pre = Preconditions { resource_version: old.resource_version(), uid: old.uid() };
            if run
                .locks
                .delete(lock_name, &DeleteParams { preconditions: Some(pre), ..Default::default() })
                .await
                .is_err()
            {
                continue;
            }
            let gone = eventually("the Lock gone", TIMEOUT, || async {
                match run.locks.get_opt(lock_name).await {
                    Ok(None) => Ok(()),
                    Ok(Some(l)) if l.uid() != old.uid() => Ok(()),
                    other => Err(format!("{:?}", other.map(|l| l.map(|l| l.uid())))),
                }
            })
            .await;
            gone.unwrap_or_else(|e| panic!("{e}"));
            create_lock(&run.locks, lock_with(lock_name, old.spec.permits, "4s", "0s")).await;
            run.journal.fault(kind, at, Some(checker::now()), lock_name);
            *done.entry(kind.name()).or_default() += 1;
            continue;
        }
        // A holder, as the Lock lists it now.
        let Ok(lock) = run.locks.get(lock_name).await else { continue };
        let holders = lock.status.map(|s| s.holders).unwrap_or_default();
        if holders.is_empty() {
            continue;
        }
        if on_pod {
            // A holder bound to a pod.
            let in_pods: Vec<_> =
                holders.iter().filter(|h| bound.contains_key(&h.holder) && h.pod_ref.is_some()).collect();
            let Some(h) = in_pods.get(run.rng.random_range(0..in_pods.len().max(1))).copied() else {
                turn -= 1; // none holds now: this kind again next time
                continue;
            };
            let pod = h.pod_ref.clone().expect("filtered").name;
            let at = checker::now();
            let result = match kind {
                FaultKind::PodDelete => pods.delete(&pod, &DeleteParams::default()).await.map(|_| true),
                FaultKind::PodForceDelete => pods
                    .delete(&pod, &DeleteParams { grace_period_seconds: Some(0), ..Default::default() })
                    .await
                    .map(|_| true),
                _ => bound[&h.holder].stop_and_report(&pod).await,
            };
            match result {
                Ok(true) => {
                    run.journal.fault(kind, at, None, format!("{lock_name} {} token {} pod {pod}", h.request, h.token));
                    if !done.contains_key(kind.name()) {
                        pod_owed.fetch_sub(1, Ordering::SeqCst);
                    }
                    *done.entry(kind.name()).or_default() += 1;
                }
                Ok(false) => turn -= 1, // it stopped holding meanwhile
                Err(e) => run.journal.report(Report::Note { at, who: "faults".into(), text: format!("{kind:?}: {e}") }),
            }
            continue;
        }
        // A `kubelock run` holder half of the time when one holds.
        let runs: Vec<_> = holders.iter().filter(|h| h.holder.starts_with("run-")).collect();
        let h = if !runs.is_empty() && run.rng.random_bool(0.5) {
            runs[run.rng.random_range(0..runs.len())]
        } else {
            &holders[run.rng.random_range(0..holders.len())]
        };
        let at = checker::now();
        let result = match kind {
            FaultKind::OthersDelete => requests.delete(&h.request, &DeleteParams::default()).await.map(|_| ()),
            FaultKind::Break => {
                let patch = serde_json::json!({"metadata": {"annotations": {
                    kubelock::api::BREAK_ANNOTATION: "fault run",
                    kubelock::api::BROKEN_BY_ANNOTATION: "faults",
                }}});
                requests.patch(&h.request, &PatchParams::default(), &Patch::Merge(&patch)).await.map(|_| ())
            }
            _ => {
                let patch = serde_json::json!({"spec": {"lockName": "elsewhere"}});
                requests.patch(&h.request, &PatchParams::default(), &Patch::Merge(&patch)).await.map(|_| ())
            }
        };
        match result {
            Ok(()) => {
                run.journal.fault(kind, at, None, format!("{lock_name} {} token {}", h.request, h.token));
                *done.entry(kind.name()).or_default() += 1;
            }
            // The holder released meanwhile.
            Err(e) => run.journal.report(Report::Note { at, who: "faults".into(), text: format!("{kind:?}: {e}") }),
        }
    }
    let stats: Vec<Stats> = join_all(tasks).await.into_iter().map(|r| r.expect("a contender panicked")).collect();
    let all = total(&stats);
    let summary = run.finish().await;
    println!(
        "contenders: {} grants, {} lost ({} kubelock run commands that trapped SIGTERM), {} errors; faults done: {done:?}",
        all.grants, all.lost, all.trapped, all.errors
    );
    for kind in kinds {
        assert!(summary.faults.get(kind.name()).copied().unwrap_or(0) > 0, "no {} happened: {summary}", kind.name());
    }
    assert!(summary.drained > 0, "no grant drained: {summary}");
    assert!(all.lost > 0, "no holder lost its grant mid-hold: {all:?}");
    assert!(all.trapped > 0, "no kubelock run command that trapped its SIGTERM had its grant ended: {all:?}");
    assert!(summary.acted > 0 && summary.fifo_pairs > 0, "{summary}");
    for (i, s) in stats.iter().enumerate() {
        assert!(s.grants > 0, "contender {i} was never granted: {s:?}");
    }
    assert!(all.problems.is_empty(), "{:?}", all.problems);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn control_plane_outages_frozen_and_skewed_holders() {
    let mut run = FaultRun::start("control_plane_outages_frozen_and_skewed_holders").await;
    run.lock("mutex", 1, "6s", "0s").await;
    run.lock("pool", 2, "6s", "0s").await;
    run.lock("frozen", 1, "3s", "1s").await;
    run.lock("skew", 1, "4s", "0s").await;
    run.start_controller();
    let stop = checker::now() + workload_time().max(Duration::from_secs(40));
    let work = |lock: &str, lease: u64, hold: (u64, u64)| Work {
        lock: lock.into(),
        permits: 1,
        lease: Duration::from_secs(lease),
        hold,
        stop,
        journal: run.journal.clone(),
    };
    let mut tasks = Vec::new();
    for i in 0..4 {
        tasks.push(tokio::spawn(contend(
            run.requester().await,
            format!("mutex-{i}"),
            work("mutex", 6, (10, 300)),
            run.seed + i,
            None,
        )));
    }
    for i in 0..3 {
        tasks.push(tokio::spawn(contend(
            run.requester().await,
            format!("pool-{i}"),
            work("pool", 6, (10, 300)),
            run.seed + 10 + i,
            None,
        )));
    }
    tasks.push(tokio::spawn(contend(
        run.requester().await,
        "frozen-lib".into(),
        work("frozen", 3, (10, 300)),
        run.seed + 20,
        None,
    )));
    tasks.push(tokio::spawn(contend(
        run.requester().await,
        "skew-waiter".into(),
        work("skew", 4, (10, 300)),
        run.seed + 21,
        None,
    )));
    // A holder whose whole runtime stalls past its lease once (a GC pause).
    let stall = Arc::new(Stall { armed: AtomicBool::new(false), length: Duration::from_secs(8) });
    tasks.push(contend_on_own_thread(
        run.env.config(Identity::Requester1).await,
        run.env.ns().into(),
        "mutex-stalls".into(),
        work("mutex", 6, (200, 600)),
        run.seed + 30,
        stall.clone(),
    ));
    // `kubelock run` holders, two of which will be frozen past their 3s lease.
    let freeze = Arc::new(AtomicUsize::new(0));
    for i in 0..3 {
        tasks.push(tokio::spawn(run_holders(
            run.env.log_dir().to_path_buf(),
            run.env.kubeconfig(Identity::Requester1),
            run.env.ns().into(),
            format!("run-{i}"),
            work("frozen", 3, (300, 1500)),
            run.seed + 40 + i,
            freeze.clone(),
            Duration::from_secs(5),
            None,
        )));
    }

    // The fault schedule: warm up; kube-apiserver down while requests queue; etcd down;
    // freezes, a stall and controller kills in between.
    let cp_seed: u64 = run.rng.random();
    let mut rng = StdRng::seed_from_u64(cp_seed);
    tokio::time::sleep(ms(&mut rng, 3000, 6000)).await;
    freeze.fetch_add(1, Ordering::SeqCst);
    let down = ms(&mut rng, 500, 3000);
    let at = checker::now();
    run.env.control_plane().kill_apiserver().expect("killing kube-apiserver");
    tokio::time::sleep(down).await; // the outage
    run.env.control_plane().start_apiserver().await.expect("restarting kube-apiserver");
    run.journal.fault(FaultKind::ApiServerKill, at, Some(checker::now()), "kube-apiserver");
    tokio::time::sleep(ms(&mut rng, 2000, 5000)).await;
    stall.armed.store(true, Ordering::SeqCst);
    let i = rng.random_range(0..run.controllers.len());
    run.kill_controller(i);
    tokio::time::sleep(ms(&mut rng, 0, 500)).await;
    run.start_controller();
    tokio::time::sleep(ms(&mut rng, 2000, 5000)).await;
    let at = checker::now();
    run.env.control_plane().kill_etcd().expect("killing etcd");
    tokio::time::sleep(ms(&mut rng, 500, 2000)).await; // the outage
    run.env.control_plane().start_etcd().await.expect("restarting etcd");
    run.journal.fault(FaultKind::EtcdKill, at, Some(checker::now()), "etcd");
    freeze.fetch_add(1, Ordering::SeqCst);
    // The skewed holder: a request of our own, renewed with the wall clock an hour off.
    let skew = tokio::spawn(skewed_holder(run.env.api(Identity::Requester1).await, run.journal.clone()));
    while checker::now() < stop {
        tokio::time::sleep(ms(&mut rng, 2000, 5000)).await;
        let i = rng.random_range(0..run.controllers.len());
        run.kill_controller(i);
        tokio::time::sleep(ms(&mut rng, 0, 500)).await;
        run.start_controller();
    }

    let skewed = skew.await.expect("the skewed holder panicked").unwrap_or_else(|e| panic!("{e}"));
    let stats: Vec<Stats> = join_all(tasks).await.into_iter().map(|r| r.expect("a contender panicked")).collect();
    let all = total(&stats);
    let faults = run.journal.snapshot().faults;
    let journal = run.journal.clone();
    let summary = run.finish().await;
    println!("contenders: {} grants, {} lost, {} errors; skewed holder: {skewed}", all.grants, all.lost, all.errors);
    assert!(all.problems.is_empty(), "{:#?}", all.problems);
    let count = |k: FaultKind| faults.iter().filter(|f| f.kind == k).count();
    assert_eq!(count(FaultKind::ApiServerKill), 1);
    assert_eq!(count(FaultKind::EtcdKill), 1);
    assert_eq!(count(FaultKind::HolderFreeze), 2, "two kubelock run holders frozen");
    let stalled = count(FaultKind::RuntimePause);
    assert_eq!(
        stalled,
        1,
        "one stalled runtime; the stalling contender: {:?}, its notes: {:#?}",
        stats[9],
        notes_of(&journal, "mutex-stalls")
    );
    assert!(summary.expiries >= 3, "the frozen and stalled holders were expired: {summary}");
}

/// A request of our own on lock `skew` (lease 4s), renewed every 1.3 s (a third of the lease)
/// with `renewTime` an hour ahead, then an hour behind, while it waits and while it holds: it
/// keeps its grant through 7 such renewals (expiry looks only for a change, never at the
/// value), then stops renewing and is expired a lease later — not earlier (the checker's
/// early-expiry rule, fed the send time of every renewal) and not much later (late-expiry).
/// A renewal that fails (the API server was down) spoils an attempt; it is retried with a new
/// request, at most 3 times.
async fn skewed_holder(requests: Api<LockRequest>, journal: Journal) -> Result<String, String> {
    let hour = SignedDuration::from_hours(1);
    let lease = Duration::from_secs(4);
    let skewed = |sign: i32| MicroTime(Timestamp::now().checked_add(hour * sign).expect("in range"));
    let note = |text: String| journal.report(Report::Note { at: checker::now(), who: "skewed".into(), text });
    let mut failures = Vec::new();
    for attempt in 0..3 {
        let name = format!("skewed-{attempt}");
        let mut request = create_request(&requests, &name, "skew", 1, None).await;
        let (mut sign, mut renewals, mut token, mut spoiled) = (1, 0, None, None);
        while renewals < 7 && spoiled.is_none() {
            let sent = checker::now();
            let patch = serde_json::json!({"spec": {"renewTime": skewed(sign)}});
            match requests.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(r) => {
                    journal.fault(FaultKind::SkewedRenewal, sent, None, if sign < 0 { "-1h" } else { "+1h" });
                    match (r.phase(), r.status.as_ref().and_then(|s| s.token)) {
                        (Phase::Granted, Some(t)) => {
                            token = Some(t);
                            journal.report(Report::NotBefore { lock: "skew".into(), token: t, at: sent + lease });
                            renewals += 1;
                        }
                        (Phase::Pending, _) => {}
                        (phase, _) => spoiled = Some(format!("{name} became {phase} while renewing: {:?}", r.status)),
                    }
                    request = r;
                }
                Err(e) => spoiled = Some(format!("{name}: a renewal failed: {e}")),
            }
            sign = -sign;
            tokio::time::sleep(Duration::from_millis(1300)).await; // a third of the lease
        }
        let dp = DeleteParams {
            preconditions: Some(Preconditions { uid: request.uid(), resource_version: None }),
            ..Default::default()
        };
        if let Some(why) = spoiled {
            note(why.clone());
            failures.push(why);
            let _ = requests.delete(&name, &dp).await;
            continue;
        }
        let stopped = checker::now();
        let expired = wait_until(&requests, &name, "the skewed holder expired", Duration::from_secs(120), |r| {
            r.phase().is_final()
        })
        .await;
        let after = checker::now() - stopped;
        let _ = requests.delete(&name, &dp).await;
        let expired = expired.map_err(|e| e.to_string())?;
        let reason = expired.status.and_then(|s| s.conditions.first().map(|c| c.reason.clone())).unwrap_or_default();
        return Ok(format!(
            "{renewals} skewed renewals kept token {}; {reason} {:.1}s after the last one (lease 4s)",
            token.unwrap_or_default(),
            after.as_secs_f64()
        ));
    }
    Err(format!("no attempt held through its renewals: {failures:?}"))
}

/// A burst of `KUBELOCK_FAULT_BURST` (1,000) requests on one mutex, from 20 concurrent
/// creators, while the controller is killed now and then. Each holder is released as soon as
/// the Lock lists it, until every request has been granted and released
/// (`KUBELOCK_FAULT_BURST_GRANTS=N` stops after the first N). The checker judges FIFO across
/// seconds, tokens, mirrors and progress; every grant is made once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_requests_is_granted_in_order() {
    let count: usize = std::env::var("KUBELOCK_FAULT_BURST").ok().and_then(|s| s.parse().ok()).unwrap_or(1000);
    let drain: usize = match std::env::var("KUBELOCK_FAULT_BURST_GRANTS").ok().as_deref() {
        None | Some("all") => count,
        Some(n) => n.parse().unwrap_or(count).min(count),
    };
    let mut run = FaultRun::start("a_burst_of_requests_is_granted_in_order").await;
    run.lock("burst", 1, "60s", "0s").await;
    run.start_controller();
    let requests: Api<LockRequest> = run.env.api(Identity::Requester1).await;
    let locks: Api<Lock> = run.env.api(Identity::Requester1).await;
    run.journal.fault(FaultKind::Burst, checker::now(), None, format!("{count} requests"));

    // The releaser: every holder the Lock lists is released at once (precondition: its UID).
    let done = Arc::new(AtomicBool::new(false));
    let released = Arc::new(AtomicUsize::new(0));
    let releaser = {
        let (requests, locks, done, released) = (requests.clone(), locks.clone(), done.clone(), released.clone());
        tokio::spawn(async move {
            let mut seen = std::collections::HashSet::new();
            let mut events = watcher(locks, watcher::Config::default().fields("metadata.name=burst"))
                .default_backoff()
                .applied_objects()
                .boxed();
            while !done.load(Ordering::SeqCst) {
                let Ok(Some(Ok(lock))) = tokio::time::timeout(Duration::from_millis(500), events.next()).await else {
                    continue;
                };
                for h in lock.status.map(|s| s.holders).unwrap_or_default() {
                    if seen.insert(h.request_uid.clone()) {
                        let (requests, released) = (requests.clone(), released.clone());
                        tokio::spawn(async move {
                            // Retried: the answer may be lost while the control plane is busy.
                            // The holder's own release: marked (the controller deletes it).
                            let mark = serde_json::json!({
                                "metadata": {"uid": h.request_uid}, "spec": {"released": true}});
                            for _ in 0..50 {
                                match requests.patch(&h.request, &PatchParams::default(), &Patch::Merge(&mark)).await {
                                    Ok(_) => break,
                                    Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 || s.code == 422 => {
                                        break;
                                    }
                                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                                }
                            }
                            released.fetch_add(1, Ordering::SeqCst);
                        });
                    }
                }
            }
        })
    };

    // The burst: `count` requests; the first HEAD one by one, then (from the next second of
    // creationTimestamp on, so that FIFO is judged across seconds however fast the machine)
    // the rest from 20 concurrent creators.
    const HEAD: usize = 10;
    let started = Instant::now();
    for i in 0..HEAD.min(count) {
        create_request(&requests, &format!("burst-{i:04}"), "burst", 1, Some("60s")).await;
    }
    let second = Timestamp::now().as_second();
    eventually("the next second", Duration::from_secs(3), || async {
        if Timestamp::now().as_second() > second { Ok(()) } else { Err("same second".to_string()) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let next = Arc::new(AtomicUsize::new(HEAD.min(count)));
    let creators: Vec<_> = (0..20)
        .map(|_| {
            let (requests, next) = (requests.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= count {
                        break;
                    }
                    create_request(&requests, &format!("burst-{i:04}"), "burst", 1, Some("60s")).await;
                }
            })
        })
        .collect();
    join_all(creators).await;
    let created = started.elapsed();

    // Drain, killing the controller now and then.
    let mut rng = StdRng::seed_from_u64(run.seed);
    let deadline = Instant::now() + Duration::from_secs(240 + 2 * drain as u64);
    while released.load(Ordering::SeqCst) < drain {
        assert!(
            Instant::now() < deadline,
            "only {} of {drain} requests granted and released after {:?}",
            released.load(Ordering::SeqCst),
            started.elapsed()
        );
        tokio::time::sleep(ms(&mut rng, 5000, 10000)).await; // the fault schedule
        if released.load(Ordering::SeqCst) >= drain {
            break;
        }
        run.kill_controller(0);
        tokio::time::sleep(ms(&mut rng, 0, 400)).await;
        run.start_controller();
    }
    let drained = started.elapsed();
    let granted = released.load(Ordering::SeqCst);
    println!("burst: {granted} drained after {:.1}s (created in {:.1}s)", drained.as_secs_f64(), created.as_secs_f64());
    done.store(true, Ordering::SeqCst);
    let _ = releaser.await;
    // The rest stay queued: the run ends here (its control plane goes with it).
    let summary = run.finish_with(false).await;
    println!(
        "burst of {count}: created in {:.1}s; the first {granted} granted and released in order after {:.1}s; {} left queued",
        created.as_secs_f64(),
        drained.as_secs_f64(),
        count - granted.min(count)
    );
    assert!(summary.grants >= drain, "{summary}");
    assert!(summary.fifo_pairs > 0, "FIFO judged across seconds: {summary}");
}

// ---------------------------------------------------------------------------------------
// Bad input on a live controller.

/// Objects the Rust types cannot read, or that the controller must refuse: a Lock status and
/// a LockRequest status with a value beyond i32 where the schema only says "integer" (written
/// through the status subresource, as an administrator or an older controller could), and a
/// Lock whose `leaseDuration` the schema's pattern admits but kubelock does not (9000h). The
/// controller keeps serving other locks, names the field in a `Ready=False` condition, rewrites
/// the unreadable status without losing the holder or its token, and grants nothing on the
/// Lock whose spec it refuses.
#[tokio::test]
async fn malformed_objects_get_a_condition_and_others_keep_being_served() {
    let f = Fixture::new().await;
    f.lock("good", 1, "30s", "0s").await;
    f.lock("bad", 1, "30s", "0s").await;
    f.lock("long", 1, "9000h", "0s").await;
    f.request("holder", "bad", 1).await;
    let granted = f.wait_phase("holder", Phase::Granted).await;
    // Tokens have a wall-clock floor: the one granted, not 1.
    let token = granted.status.as_ref().and_then(|s| s.token).expect("a granted request has a token");

    // Every version of the bad Lock, untyped (some will not fit the Rust types).
    let admin = f.env.admin().await;
    let dynamic = |kind: kube::api::ApiResource| {
        Api::<kube::api::DynamicObject>::namespaced_with(admin.clone(), f.env.ns(), &kind)
    };
    let lock_kind = kube::api::ApiResource::erase::<Lock>(&());
    let versions = Arc::new(std::sync::Mutex::new(Vec::<serde_json::Value>::new()));
    let recorder = {
        let (api, versions) = (dynamic(lock_kind.clone()), versions.clone());
        tokio::spawn(async move {
            let mut events = watcher(api, watcher::Config::default().fields("metadata.name=bad"))
                .default_backoff()
                .applied_objects()
                .boxed();
            while let Some(event) = events.next().await {
                if let Ok(obj) = event {
                    versions.lock().unwrap().push(serde_json::to_value(&obj).unwrap_or_default());
                }
            }
        })
    };
    eventually("the recorder to see the bad lock", TIMEOUT, || async {
        if versions.lock().unwrap().is_empty() { Err("nothing yet".to_string()) } else { Ok(()) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    let too_big = i64::from(i32::MAX) + 1;
    let patch = serde_json::json!({"status": {"position": too_big}});
    dynamic(kube::api::ApiResource::erase::<LockRequest>(&()))
        .patch_status("holder", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("the schema accepts any integer for status.position");
    let patch = serde_json::json!({"status": {"waiting": too_big}});
    dynamic(lock_kind)
        .patch_status("bad", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("the schema accepts any integer for status.waiting");

    // Other locks are still served.
    f.request("first", "good", 1).await;
    f.wait_phase("first", Phase::Granted).await;
    f.request("second", "good", 1).await;
    f.release("first").await;
    f.wait_phase("second", Phase::Granted).await;

    // The bad Lock said what was wrong, naming the field, then its status was rewritten with
    // its holder and token intact.
    let healed = eventually("the bad lock's status named and rewritten", TIMEOUT, || async {
        let seen = versions.lock().unwrap().clone();
        let named = seen.iter().any(|v| {
            v["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter().any(|c| {
                    c["type"] == "Ready"
                        && c["status"] == "False"
                        && c["message"].as_str().is_some_and(|m| m.contains("status.waiting"))
                })
            })
        });
        let last = seen.last().cloned().unwrap_or_default();
        let holder_kept = last["status"]["holders"]
            .as_array()
            .is_some_and(|hs| hs.iter().any(|h| h["request"] == "holder" && h["token"] == token));
        let readable = last["status"]["waiting"].as_i64().is_some_and(|w| w <= i64::from(i32::MAX));
        if named && holder_kept && readable {
            Ok(last)
        } else {
            Err(format!("named={named} holder_kept={holder_kept}; last: {last}"))
        }
    })
    .await;
    recorder.abort();
    if let Err(e) = healed {
        f.env.dump();
        panic!("{e}");
    }
    let holder = wait_until(&f.requests, "holder", "the holder's status rewritten", TIMEOUT, |r| {
        r.phase() == Phase::Granted && r.status.as_ref().is_some_and(|s| s.token == Some(token))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(holder.status.and_then(|s| s.position), None);

    // A spec kubelock refuses: Ready=False naming the field, nothing granted.
    f.request("waiter", "long", 1).await;
    let long = wait_until(&f.locks, "long", "Ready=False on the 9000h lock", TIMEOUT, |l| {
        l.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "False"))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let ready = long.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready")).cloned().unwrap();
    assert!(ready.message.contains("spec.leaseDuration"), "{ready:?}");
    let waiter = wait_until(&f.requests, "waiter", "the waiter told why", TIMEOUT, |r| {
        r.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.reason == "InvalidLock"))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(waiter.phase(), Phase::Pending);
}
