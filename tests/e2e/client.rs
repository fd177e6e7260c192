//! The client side against the real control plane and the real controller: `kubelock run`
//! wrappers contending for a mutex and a semaphore, a frozen holder and fencing, the
//! sidecar's readiness and release, the init-container hand-off, exit codes, the kubectl
//! plugin, and the Rust leader-election helper.
//!
//! Every test runs its own controller (`kubelock controller --watch-namespace <ns>`) as the
//! admin, and its clients as `kubelock-requester-1` with only the rights a requester needs.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::ExitStatus,
    time::{Duration, Instant},
};

use kube::{Api, ResourceExt as _, api::ListParams};
use kubelock::{
    api::{Lock, LockRequest, Phase},
    client::{AcquireOptions, LeaderElector, Leadership, LockClient, Term},
};
use rustix::process::Signal;
use tokio_util::sync::CancellationToken;

use crate::support::{
    Cmd, Identity, Proc, ServerFaults as _, TIMEOUT, TestEnv, eventually,
    fixtures::{ControllerCmd, Fixture, create_lock, create_pod, free_port, http_get, lock_with, requester_rules},
    process::KUBELOCK,
    wait_until,
};

/// A test namespace with a controller for it, a requester identity with a requester's
/// rights, and some Locks.
struct World {
    env: TestEnv,
    _controller: Proc,
}

/// `(name, permits, leaseDuration, lockDelay)`
type LockDef<'a> = (&'a str, i32, &'a str, &'a str);

async fn world(locks: &[LockDef<'_>]) -> World {
    let env = TestEnv::new().await;
    env.grant(Identity::Requester1, requester_rules()).await;
    let controller = ControllerCmd::new(&env, Identity::Admin, "controller").spawn();
    let api: Api<Lock> = env.api(Identity::Admin).await;
    for (name, permits, lease, delay) in locks {
        create_lock(&api, lock_with(name, *permits, lease, delay)).await;
    }
    World { env, _controller: controller }
}

impl World {
    /// `kubelock run --lock LOCK [extra...] -- sh -c SCRIPT` as the requester.
    fn run(&self, name: &str, lock: &str, extra: &[&str], script: &str) -> Cmd {
        self.env
            .kubelock(Identity::Requester1, name)
            .args(["run", "--lock", lock])
            .args(extra)
            .args(["--", "sh", "-c", script])
    }

    fn path(&self, file: &str) -> PathBuf {
        self.env.log_dir().join(file)
    }

    async fn locks(&self) -> Api<Lock> {
        self.env.api(Identity::Admin).await
    }

    async fn requests(&self) -> Api<LockRequest> {
        self.env.api(Identity::Admin).await
    }
}

fn code(status: Option<ExitStatus>, what: &str, proc: &Proc) -> i32 {
    let status = status.unwrap_or_else(|| panic!("{what}: did not exit in time; stderr:\n{}", proc.stderr_tail(30)));
    use std::os::unix::process::ExitStatusExt as _;
    status
        .code()
        .unwrap_or_else(|| panic!("{what}: killed by signal {:?}; stderr:\n{}", status.signal(), proc.stderr_tail(30)))
}

/// One ledger line: `start|end TOKEN NANOS`.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    kind: String,
    token: i64,
    at: u128,
}

fn read_ledger(path: &Path) -> Vec<Entry> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 3, "malformed ledger line {l:?}");
            Entry {
                kind: f[0].to_string(),
                token: f[1].parse().unwrap_or_else(|_| panic!("token in {l:?}")),
                at: f[2].parse().unwrap_or_else(|_| panic!("time in {l:?}")),
            }
        })
        .collect()
}

/// The most intervals open at once, by file order and by timestamps.
fn max_open(entries: &[Entry]) -> (usize, usize) {
    let mut open = 0i64;
    let mut by_order = 0i64;
    for e in entries {
        open += if e.kind == "start" { 1 } else { -1 };
        by_order = by_order.max(open);
    }
    let mut points: Vec<(u128, i64)> = entries.iter().map(|e| (e.at, if e.kind == "start" { 1 } else { -1 })).collect();
    // At equal times count the end first: touching intervals do not overlap.
    points.sort();
    let (mut open, mut by_time) = (0i64, 0i64);
    for (_, d) in points {
        open += d;
        by_time = by_time.max(open);
    }
    (by_order as usize, by_time as usize)
}

/// A child that appends `start TOKEN NANOS`, holds for `hold`, appends `end TOKEN NANOS`.
fn ledger_script(ledger: &Path, hold: &str) -> String {
    let l = ledger.display();
    format!(
        "echo \"start $KUBELOCK_TOKEN $(date +%s%N)\" >> {l}; sleep {hold}; echo \"end $KUBELOCK_TOKEN $(date +%s%N)\" >> {l}"
    )
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Six wrappers on one mutex: the intervals in the ledger never overlap and the tokens
/// strictly increase in the order the holders ran.
#[tokio::test]
async fn six_wrappers_on_a_mutex_never_overlap_and_tokens_increase() {
    let w = world(&[("mutex", 1, "10s", "0s")]).await;
    let ledger = w.path("ledger");
    let mut procs: Vec<Proc> =
        (0..6).map(|i| w.run(&format!("run-{i}"), "mutex", &[], &ledger_script(&ledger, "0.2")).spawn()).collect();
    for (i, p) in procs.iter_mut().enumerate() {
        let status = p.wait(Duration::from_secs(90)).await;
        assert_eq!(code(status, &format!("run-{i}"), p), 0, "run-{i} stderr:\n{}", p.stderr_tail(20));
    }
    let entries = read_ledger(&ledger);
    assert_eq!(entries.len(), 12, "ledger: {entries:#?}");
    let mut last_token = i64::MIN;
    let mut gaps = vec![];
    for pair in entries.chunks(2) {
        let (start, end) = (&pair[0], &pair[1]);
        assert_eq!((start.kind.as_str(), end.kind.as_str()), ("start", "end"), "interleaved: {entries:#?}");
        assert_eq!(start.token, end.token, "interleaved: {entries:#?}");
        assert!(start.token > last_token, "tokens not strictly increasing: {entries:#?}");
        last_token = start.token;
    }
    for w2 in entries.windows(2) {
        if w2[0].kind == "end" {
            assert!(w2[1].at >= w2[0].at, "interval starts before the previous ended: {entries:#?}");
            gaps.push((w2[1].at - w2[0].at) as f64 / 1e6);
        }
    }
    assert_eq!(max_open(&entries), (1, 1));
    gaps.sort_by(f64::total_cmp);
    eprintln!(
        "mutex handover, child end -> next child start (release, grant, watch, spawn): p50 {:.1} ms, max {:.1} ms over {} handovers",
        percentile(&gaps, 0.5),
        percentile(&gaps, 1.0),
        gaps.len()
    );
}

/// Six wrappers on a 3-permit semaphore: never more than 3 holders at once (and 3 reached).
#[tokio::test]
async fn six_wrappers_on_a_three_permit_semaphore_never_exceed_three() {
    let w = world(&[("sem", 3, "10s", "0s")]).await;
    let ledger = w.path("ledger");
    let mut procs: Vec<Proc> =
        (0..6).map(|i| w.run(&format!("run-{i}"), "sem", &[], &ledger_script(&ledger, "1.5")).spawn()).collect();
    for (i, p) in procs.iter_mut().enumerate() {
        let status = p.wait(Duration::from_secs(90)).await;
        assert_eq!(code(status, &format!("run-{i}"), p), 0, "run-{i} stderr:\n{}", p.stderr_tail(20));
    }
    let entries = read_ledger(&ledger);
    assert_eq!(entries.len(), 12, "ledger: {entries:#?}");
    let (by_order, by_time) = max_open(&entries);
    assert!(by_order <= 3 && by_time <= 3, "more than 3 holders at once ({by_order}, {by_time}): {entries:#?}");
    assert_eq!(by_order, 3, "the semaphore never had 3 holders at once: {entries:#?}");
    let tokens: BTreeSet<i64> = entries.iter().filter(|e| e.kind == "start").map(|e| e.token).collect();
    assert_eq!(tokens.len(), 6, "a token was issued twice: {entries:#?}");
}

/// A fenced resource: appends `accepted TOKEN WHO` unless TOKEN is lower than the highest
/// token it has accepted, else `refused TOKEN WHO highest=H`.
fn fenced_writer(dir: &Path) -> PathBuf {
    let script = dir.join("fenced-write.sh");
    std::fs::write(
        &script,
        r#"#!/bin/sh
# fenced-write.sh LEDGER TOKEN WHO
exec 9>>"$1.lock"
flock 9
max=$(cat "$1.max" 2>/dev/null || echo 0)
if [ "$2" -ge "$max" ]; then
  echo "$2" > "$1.max"
  echo "accepted $2 $3" >> "$1"
else
  echo "refused $2 $3 highest=$max" >> "$1"
fi
"#,
    )
    .expect("writing the fenced writer");
    script
}

/// A holder whose wrapper is frozen past its lease (a stalled runtime, a process stopped by a
/// debugger) while its command goes on writing: the next waiter is granted only after the
/// lease and the lock delay; the command's writes with the old token are refused by the
/// fenced ledger from the moment the successor wrote; on SIGCONT the wrapper sees at once
/// that its deadline passed, kills its command and exits 75.
#[tokio::test]
async fn a_frozen_holder_loses_at_its_deadline_and_its_late_writes_are_fenced_off() {
    let lease = Duration::from_secs(4);
    let lock_delay = Duration::from_secs(2);
    let w = world(&[("frozen", 1, "4s", "2s")]).await;
    let writer = fenced_writer(w.env.log_dir());
    let ledger = w.path("fenced");
    let (w_, l_) = (writer.display(), ledger.display());
    let a_ready = w.path("a.ready");
    let b_ready = w.path("b.ready");
    // A writes once, then keeps writing with the token it was started with.
    let a_script = format!(
        "sh {w_} {l_} $KUBELOCK_TOKEN a; touch {}; while :; do sleep 0.1; sh {w_} {l_} $KUBELOCK_TOKEN a-late; done",
        a_ready.display()
    );
    // The command in a process group of its own: SIGSTOP to the wrapper alone.
    let mut a = w.run("holder-a", "frozen", &["--process-group", "own", "--grace", "1s"], &a_script).spawn();
    eventually("A to hold and write", TIMEOUT, || async {
        if a_ready.exists() { Ok(()) } else { Err(format!("A stderr: {}", a.stderr_tail(5))) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let locks = w.locks().await;
    let held = wait_until(&locks, "frozen", "A holding", TIMEOUT, |l| l.granted_permits() == 1).await.expect("A holds");
    let a_token = held.status.as_ref().map(|s| s.holders[0].token).expect("a holder");

    let b_script = format!("sh {w_} {l_} $KUBELOCK_TOKEN b; touch {}; sleep 1", b_ready.display());
    let mut b = w.run("waiter-b", "frozen", &[], &b_script).spawn();
    wait_until(&locks, "frozen", "B queued", TIMEOUT, |l| l.status.as_ref().is_some_and(|s| s.waiting == 1))
        .await
        .expect("B queued");

    // Freeze A's wrapper: it can neither renew nor stop its command.
    let wrapper = rustix::process::Pid::from_raw(a.pid() as i32).expect("A's pid");
    let frozen_at = Instant::now();
    rustix::process::kill_process(wrapper, Signal::STOP).expect("SIGSTOP to A's wrapper");

    let granted = wait_until(&locks, "frozen", "B granted after A's expiry", lease * 3 + lock_delay * 2, |l| {
        l.status.as_ref().is_some_and(|s| s.fencing_token > a_token && !s.holders.is_empty())
    })
    .await;
    let waited = frozen_at.elapsed();
    let granted = match granted {
        Ok(l) => l,
        Err(e) => {
            let _ = rustix::process::kill_process(wrapper, Signal::CONT);
            panic!("{e}");
        }
    };
    let b_token = granted.status.as_ref().map(|s| s.holders[0].token).expect("B holds");
    // A's last renewal left at most lease/3 before the freeze; the controller waits a full
    // lease from its observation of it, then the lock delay.
    let earliest = lease - lease / 3 + lock_delay - Duration::from_millis(100);
    assert!(
        waited >= earliest,
        "B was granted {waited:?} after A froze: earlier than lease + lockDelay allow ({earliest:?})"
    );
    eventually("B to write, and A's command to be refused after it", TIMEOUT, || async {
        let text = std::fs::read_to_string(&ledger).unwrap_or_default();
        let refused = format!("refused {a_token} a-late highest={b_token}");
        if b_ready.exists() && text.lines().any(|l| l == refused) { Ok(()) } else { Err(text) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    // Thaw A.
    let thawed_at = Instant::now();
    rustix::process::kill_process(wrapper, Signal::CONT).expect("SIGCONT to A's wrapper");
    let status = a.wait(Duration::from_secs(10)).await;
    let stopped_after = thawed_at.elapsed();
    assert_eq!(code(status, "holder A", &a), 75, "A must exit 75 (lock lost); stderr:\n{}", a.stderr_tail(20));
    let a_err = a.stderr_tail(20);
    assert!(
        // Thawed, its deadline timer and the guard's loss fire together: either tells it.
        a_err.contains("the local lease deadline passed without a successful renewal"),
        "A must say its deadline passed; stderr:\n{a_err}"
    );
    assert!(
        stopped_after < Duration::from_secs(2),
        "A took {stopped_after:?} after SIGCONT to stop its command and exit"
    );

    let status = b.wait(TIMEOUT).await;
    assert_eq!(code(status, "waiter B", &b), 0);
    // The ledger: A's writes accepted until B's, every later write of A's refused.
    let text = std::fs::read_to_string(&ledger).expect("ledger");
    let lines: Vec<&str> = text.lines().collect();
    let b_at = lines.iter().position(|l| *l == format!("accepted {b_token} b")).expect("B's write accepted");
    assert!(lines[..b_at].iter().all(|l| l.starts_with(&format!("accepted {a_token} a"))), "{lines:#?}");
    assert!(lines[b_at + 1..].iter().all(|l| l.starts_with(&format!("refused {a_token} a-late"))), "{lines:#?}");
    eprintln!(
        "frozen holder: B granted {:.2}s after the freeze (lease {lease:?}, lockDelay {lock_delay:?}); {} late writes of A refused; A exited {:.0} ms after SIGCONT",
        waited.as_secs_f64(),
        lines.len() - b_at - 1,
        stopped_after.as_secs_f64() * 1e3
    );
}

/// With the API server unreachable (paused), a holder still stops at its own deadline.
#[tokio::test]
async fn a_holder_cut_off_from_the_api_server_stops_at_its_deadline() {
    let env = TestEnv::private().await;
    let controller = ControllerCmd::new(&env, Identity::Admin, "controller").spawn();
    let locks: Api<Lock> = env.api(Identity::Admin).await;
    create_lock(&locks, lock_with("cut", 1, "3s", "0s")).await;
    let ready = env.log_dir().join("ready");
    let mut holder = env
        .kubelock(Identity::Admin, "holder")
        .args(["--request-timeout", "1s", "run", "--lock", "cut", "--grace", "1s", "--", "sh", "-c"])
        .arg(format!("touch {}; sleep 60", ready.display()))
        .spawn();
    eventually("the holder to run its command", TIMEOUT, || async {
        if ready.exists() { Ok(()) } else { Err(holder.stderr_tail(5)) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let cp = env.control_plane();
    let paused_at = Instant::now();
    cp.pause(kubelock::devenv::Component::ApiServer).expect("pausing kube-apiserver");
    let status = holder.wait(Duration::from_secs(15)).await;
    let after = paused_at.elapsed();
    cp.resume(kubelock::devenv::Component::ApiServer).expect("resuming kube-apiserver");
    assert_eq!(code(status, "holder", &holder), 75, "stderr:\n{}", holder.stderr_tail(20));
    // Deadline = (send time of the last renewal, at most lease/3 before the pause) + 3s - 300ms.
    // SIGTERM `grace` before the deadline: the command (sleep) stops at once.
    assert!(after <= Duration::from_millis(2700 + 500), "stopped {after:?} after the API server went away");
    assert!(after >= Duration::from_millis(2700 - 1000 - 1000 - 100), "stopped too early: {after:?}");
    assert!(holder.stderr_tail(20).contains("deadline passed"), "{}", holder.stderr_tail(20));
    eprintln!(
        "API server paused: the holder stopped its command and exited {:.2}s later (lease 3s)",
        after.as_secs_f64()
    );
    drop(controller);
}

/// A command that ignores SIGTERM and keeps writing is killed at the local deadline at the
/// latest: past it the next holder may be granted (a lease after the last renewal the
/// controller saw). It is told to stop `--grace` before.
/// A command that exits while processes it started still run (a shell's background worker):
/// `kubelock run` releases only once its group is empty, so the lock is never free while the
/// worker may still act.
#[tokio::test]
async fn the_lock_is_released_only_once_nothing_the_command_started_runs() {
    let f = Fixture::new().await;
    f.lock("left", 1, "10s", "0s").await;
    let pid_file = f.env.log_dir().join("worker.pid");
    let script =
        format!("(trap '' TERM; while :; do sleep 0.05; done) & echo $! > {p}; exit 0", p = pid_file.display());
    let mut run = f
        .env
        .kubelock(Identity::Requester1, "run")
        .args(["run", "--lock", "left", "--process-group", "own", "--", "sh", "-c", &script])
        .spawn();
    let status = run.wait(TIMEOUT).await;
    assert_eq!(code(status, "run", &run), 0, "stderr:\n{}", run.stderr_tail(20));
    let pid: u32 = std::fs::read_to_string(&pid_file).expect("the worker's pid").trim().parse().expect("a pid");
    wait_until(&f.locks, "left", "the lock free", TIMEOUT, |l| {
        l.status.as_ref().is_some_and(|s| s.fencing_token > 0 && s.holders.is_empty() && s.draining.is_empty())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let worker = crate::support::ProcessId::of(pid);
    assert!(
        worker.as_ref().is_none_or(|w| !w.alive()),
        "the lock is free while the command's worker {pid} still runs: {:?}",
        worker.map(|w| w.cmdline())
    );
}

/// The same for what the command leaves outside its process group: with `--process-group
/// same` (the command shares kubelock's group, which kubelock cannot kill) and with a worker
/// that started a session of its own (`setsid`). Before, the release came as soon as the
/// group was empty, and the next holder was granted while the worker still ran.
#[tokio::test]
async fn the_lock_is_released_only_once_nothing_the_command_started_runs_outside_its_group() {
    let f = Fixture::new().await;
    for (i, (group, launch)) in [("same", ""), ("own", "setsid ")].into_iter().enumerate() {
        let lock = format!("left-{i}");
        f.lock(&lock, 1, "10s", "0s").await;
        let pid_file = f.env.log_dir().join(format!("worker-{i}.pid"));
        // The worker writes its own PID (setsid may fork), ignores SIGTERM, and stops by itself
        // after a while (never left behind). The command exits once the worker runs.
        let p = pid_file.display();
        let worker = format!(
            "echo $$ > {p}.tmp; mv {p}.tmp {p}; trap \"\" TERM; n=0; while [ $n -lt 1200 ]; do sleep 0.05; n=$((n+1)); done"
        );
        let script = format!("{launch}sh -c '{worker}' & while [ ! -e {p} ]; do sleep 0.01; done; exit 0");
        let mut run = f
            .env
            .kubelock(Identity::Requester1, &format!("run-{group}"))
            .args(["run", "--lock", &lock, "--process-group", group, "--", "sh", "-c", &script])
            .spawn();
        let status = run.wait(TIMEOUT).await;
        assert_eq!(code(status, "run", &run), 0, "{group}: stderr:\n{}", run.stderr_tail(20));
        let pid: u32 = std::fs::read_to_string(&pid_file).expect("the worker's pid").trim().parse().expect("a pid");
        wait_until(&f.locks, &lock, "the lock free", TIMEOUT, |l| {
            l.status.as_ref().is_some_and(|s| s.fencing_token > 0 && s.holders.is_empty() && s.draining.is_empty())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let worker = crate::support::ProcessId::of(pid).map(|w| w.cmdline());
        if worker.is_some()
            && let Some(p) = rustix::process::Pid::from_raw(pid as i32)
        {
            let _ = rustix::process::kill_process(p, Signal::KILL);
        }
        assert!(
            worker.is_none(),
            "--process-group {group}: the lock is free while the command's worker {pid} still runs: {worker:?}"
        );
    }
}

#[tokio::test]
async fn a_command_that_ignores_sigterm_is_killed_by_the_deadline() {
    let env = TestEnv::private().await;
    let controller = ControllerCmd::new(&env, Identity::Admin, "controller").spawn();
    let locks: Api<Lock> = env.api(Identity::Admin).await;
    create_lock(&locks, lock_with("stubborn", 1, "3s", "0s")).await;
    let log = env.log_dir().join("writes");
    // Every write and the SIGTERM stamped with CLOCK_BOOTTIME (the first field of /proc/uptime).
    let script = format!(
        "trap 'echo term $(cut -d\" \" -f1 /proc/uptime) >> {l}' TERM; \
         while :; do echo write $(cut -d\" \" -f1 /proc/uptime) >> {l}; sleep 0.05; done",
        l = log.display()
    );
    let mut holder = env
        .kubelock(Identity::Admin, "holder")
        .args(["--request-timeout", "1s", "run", "--lock", "stubborn", "--grace", "1s", "--process-group", "own"])
        .args(["--", "sh", "-c", &script])
        .spawn();
    eventually("the command to write", TIMEOUT, || async {
        if std::fs::read_to_string(&log).is_ok_and(|t| t.contains("write")) {
            Ok(())
        } else {
            Err(holder.stderr_tail(5))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let cp = env.control_plane();
    let paused_at = kubelock::client::BootInstant::now().since_boot().as_secs_f64();
    cp.pause(kubelock::devenv::Component::ApiServer).expect("pausing kube-apiserver");
    let status = holder.wait(Duration::from_secs(15)).await;
    cp.resume(kubelock::devenv::Component::ApiServer).expect("resuming kube-apiserver");
    assert_eq!(code(status, "holder", &holder), 75, "stderr:\n{}", holder.stderr_tail(20));
    let text = std::fs::read_to_string(&log).expect("the log");
    let stamp =
        |kind: &str| -> Vec<f64> { text.lines().filter_map(|l| l.strip_prefix(kind)?.trim().parse().ok()).collect() };
    let last_write = *stamp("write ").last().expect("writes");
    let term = *stamp("term ").first().expect("the command was sent SIGTERM");
    // The deadline: the last renewal's send (before the pause) + 3s − 300ms margin.
    let deadline_at_most = paused_at + 2.7;
    assert!(
        last_write <= deadline_at_most + 0.1,
        "wrote {:.2}s after the pause, past the deadline",
        last_write - paused_at
    );
    assert!(
        term <= deadline_at_most - 1.0 + 0.1,
        "SIGTERM came {:.2}s after the pause, not grace before the deadline",
        term - paused_at
    );
    assert!(
        text.lines().any(|l| l.starts_with("write ") && l[6..].trim().parse::<f64>().is_ok_and(|t| t > term)),
        "the command went on writing after SIGTERM (it ignores it): {text}"
    );
    eprintln!(
        "SIGTERM ignored: told to stop {:.2}s and last write {:.2}s after the API server went away (lease 3s, grace 1s)",
        term - paused_at,
        last_write - paused_at
    );
    drop(controller);
}

/// A waiter whose own deadline passes while the API server is unreachable withdraws its
/// request when it asks again: left queued, it would be granted later and hold the lock
/// unused until it expired (found by a fault run, where controller restarts kept such a
/// grant alive for over a minute).
#[tokio::test]
async fn a_waiter_past_its_deadline_withdraws_its_request() {
    let env = TestEnv::private().await;
    let _controller = ControllerCmd::new(&env, Identity::Admin, "controller").spawn();
    let locks: Api<Lock> = env.api(Identity::Admin).await;
    let requests: Api<LockRequest> = env.api(Identity::Admin).await;
    create_lock(&locks, lock_with("queue", 1, "3s", "0s")).await;
    let (held, ran) = (env.log_dir().join("held"), env.log_dir().join("ran"));
    let wrapper = |name: &str, file: &Path| {
        env.kubelock(Identity::Admin, name)
            .args(["--request-timeout", "1s", "run", "--lock", "queue", "--holder", name, "--grace", "1s", "--"])
            .args(["sh", "-c"])
            .arg(format!("touch {}; sleep 60", file.display()))
            .spawn()
    };
    let holder = wrapper("holder", &held);
    eventually("the holder to run its command", TIMEOUT, || async {
        if held.exists() { Ok(()) } else { Err(holder.stderr_tail(5)) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let mut waiter = wrapper("waiter", &ran);
    let queued =
        wait_until(&locks, "queue", "a waiter", TIMEOUT, |l| l.status.as_ref().is_some_and(|s| s.waiting == 1))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    let first = queued.status.and_then(|s| s.queue.first().cloned()).expect("the waiter's request in the queue");

    // Both lose their deadline (3s lease) while the API server is away.
    let cp = env.control_plane();
    cp.pause(kubelock::devenv::Component::ApiServer).expect("pausing kube-apiserver");
    tokio::time::sleep(Duration::from_secs(5)).await; // the outage: longer than the lease
    cp.resume(kubelock::devenv::Component::ApiServer).expect("resuming kube-apiserver");

    // The waiter asked again with a new request and withdrew the first, which was never granted.
    if let Err(e) = crate::support::wait_gone(&requests, &first, TIMEOUT).await {
        let left = requests.get_opt(&first).await.ok().flatten().and_then(|r| r.status);
        panic!("{e}: the first request is still there: {left:?}\nwaiter:\n{}", waiter.stderr_tail(10));
    }
    eventually("the waiter to run its command", TIMEOUT, || async {
        if ran.exists() { Ok(()) } else { Err(waiter.stderr_tail(5)) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(waiter.stderr_tail(30).contains("asking again"), "{}", waiter.stderr_tail(30));
    waiter.signal(Signal::TERM);
    let _ = waiter.wait(TIMEOUT).await;
}

/// Exit codes: the command's own, 128+signal, 76 on wait timeout (request withdrawn), 77
/// when rejected, 127 for a missing command, and SIGTERM to the wrapper reaches the command
/// and releases the lock.
#[tokio::test]
async fn run_propagates_exit_codes_times_out_and_forwards_signals() {
    let w = world(&[("exit", 1, "10s", "0s")]).await;
    let out = w.run("code-7", "exit", &[], "exit 7").output(TIMEOUT).await;
    assert_eq!(out.status.and_then(|s| s.code()), Some(7), "stderr:\n{}", out.stderr);
    let out = w.run("killed", "exit", &[], "kill -KILL $$").output(TIMEOUT).await;
    assert_eq!(out.status.and_then(|s| s.code()), Some(137), "stderr:\n{}", out.stderr);
    let out = w
        .run("env", "exit", &[], "echo $KUBELOCK_LOCK $KUBELOCK_TOKEN $KUBELOCK_LOCK_UID $KUBELOCK_REQUEST")
        .output(TIMEOUT)
        .await;
    let lock = w.locks().await.get("exit").await.expect("lock");
    let fields: Vec<&str> = out.stdout.split_whitespace().collect();
    assert_eq!(fields.len(), 4, "env of the command: {:?}", out.stdout);
    assert_eq!(fields[0], "exit");
    assert!(fields[1].parse::<i64>().is_ok_and(|t| t >= 1), "{:?}", out.stdout);
    assert_eq!(Some(fields[2].to_string()), lock.uid());
    assert!(fields[3].starts_with("exit-"), "{:?}", out.stdout);

    let out = w
        .env
        .kubelock(Identity::Requester1, "missing")
        .args(["run", "--lock", "exit", "--", "no-such-command-here"])
        .output(TIMEOUT)
        .await;
    assert_eq!(out.status.and_then(|s| s.code()), Some(127), "stderr:\n{}", out.stderr);
    assert!(out.stderr.contains("no-such-command-here: command not found"), "{}", out.stderr);
    let out = w.run("rejected", "exit", &["--permits", "2"], "true").output(TIMEOUT).await;
    assert_eq!(out.status.and_then(|s| s.code()), Some(77), "stderr:\n{}", out.stderr);
    assert!(out.stderr.contains("rejected"), "{}", out.stderr);

    // A holder, then a waiter that gives up.
    let ready = w.path("holder.ready");
    let mut holder = w.run("holder", "exit", &[], &format!("touch {}; sleep 60", ready.display())).spawn();
    eventually("the holder to run", TIMEOUT, || async {
        if ready.exists() { Ok(()) } else { Err(holder.stderr_tail(5)) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    let out = w.run("impatient", "exit", &["--wait-timeout", "1s"], "echo should-not-run").output(TIMEOUT).await;
    let took = started.elapsed();
    assert_eq!(out.status.and_then(|s| s.code()), Some(76), "stderr:\n{}", out.stderr);
    assert!(out.stderr.contains("timed out after 1s waiting for lock exit"), "{}", out.stderr);
    assert!(!out.stdout.contains("should-not-run"));
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(10), "took {took:?}");
    // Its request was withdrawn (marked released as it exited; the controller deletes it):
    // only the holder's remains.
    let requests = w.requests().await;
    let left = requests.list(&ListParams::default()).await.expect("listing requests");
    let pending: Vec<String> =
        left.items.iter().filter(|r| r.phase() == Phase::Pending && !r.spec.released).map(|r| r.name_any()).collect();
    assert!(pending.is_empty(), "the timed-out request was not withdrawn: {pending:?}");
    eventually("the withdrawn request deleted", TIMEOUT, || async {
        let left = requests.list(&ListParams::default()).await.map_err(|e| e.to_string())?;
        let names: Vec<String> =
            left.items.iter().filter(|r| r.phase() == Phase::Pending).map(|r| r.name_any()).collect();
        if names.is_empty() { Ok(()) } else { Err(format!("{names:?}")) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    // SIGTERM to the wrapper: forwarded, the command dies of it (143), the lock is released.
    holder.signal(Signal::TERM);
    let status = holder.wait(TIMEOUT).await;
    assert_eq!(code(status, "holder", &holder), 143, "stderr:\n{}", holder.stderr_tail(20));
    let locks = w.locks().await;
    wait_until(&locks, "exit", "released", TIMEOUT, |l| l.granted_permits() == 0).await.expect("released");
    let left = requests.list(&ListParams::default()).await.expect("listing requests");
    assert!(
        left.items.iter().all(|r| r.phase().is_final()),
        "requests left after release: {:?}",
        left.items.iter().map(|r| (r.name_any(), r.phase())).collect::<Vec<_>>()
    );
}

async fn status_json(port: u16) -> Result<serde_json::Value, String> {
    let response = http_get(port, "/status").await?;
    if response.status != 200 {
        return Err(format!("/status answered {}", response.status));
    }
    serde_json::from_str(&response.body).map_err(|e| format!("{e}: {}", response.body))
}

async fn await_ready(port: u16, want: u16, what: &str, timeout: Duration) -> Duration {
    let started = Instant::now();
    eventually(what, timeout, || async {
        match http_get(port, "/readyz").await {
            Ok(r) if r.status == want => Ok(()),
            Ok(r) => Err(format!("/readyz {}", r.status)),
            Err(e) => Err(e),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    started.elapsed()
}

impl World {
    async fn sidecar(&self, pod: &str, port: u16, dir: &Path) -> Proc {
        let uid = create_pod(&self.env.api(Identity::Admin).await, pod).await.uid().expect("uid");
        self.env
            .kubelock(Identity::Requester1, &format!("sidecar-{pod}"))
            .env("POD_NAME", pod)
            .env("POD_NAMESPACE", self.env.ns())
            .env("POD_UID", uid)
            .args(["sidecar", "--lock", "active"])
            .arg("--dir")
            .arg(dir)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .spawn()
    }
}

fn read_file(dir: &Path, name: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(name)).ok().map(|s| s.trim().to_string())
}

/// Two sidecars on one lock: /readyz is 200 only on the holder; a break flips it back (files
/// removed) and the other is granted; SIGTERM releases at once and the next waiter is granted.
#[tokio::test]
async fn sidecar_readiness_follows_the_lock_and_sigterm_hands_over() {
    let w = world(&[("active", 1, "6s", "0s")]).await;
    let (pa, pb) = (free_port(), free_port());
    let (da, db) = (w.path("a"), w.path("b"));
    let _a = w.sidecar("pod-a", pa, &da).await;
    await_ready(pa, 200, "sidecar A ready", TIMEOUT).await;
    let st = status_json(pa).await.expect("status of A");
    assert_eq!(st["held"], true, "{st}");
    assert_eq!(read_file(&da, "token"), Some(st["token"].to_string()), "token file of A");
    assert_eq!(read_file(&da, "state").as_deref(), Some("holding"));
    let a_request = st["request"].as_str().expect("request").to_string();
    let requests = w.requests().await;
    let req = requests.get(&a_request).await.expect("A's request");
    assert_eq!(req.spec.holder_identity, format!("pod/{}/pod-a", w.env.ns()));
    assert_eq!(req.spec.pod_ref.as_ref().map(|p| p.name.as_str()), Some("pod-a"));
    assert_eq!(req.owner_references().first().map(|o| o.kind.as_str()), Some("Pod"));

    let mut b = w.sidecar("pod-b", pb, &db).await;
    eventually("B waiting", TIMEOUT, || async {
        let s = status_json(pb).await?;
        if s["state"] == "waiting" && s["request"].is_string() { Ok(()) } else { Err(s.to_string()) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(http_get(pb, "/readyz").await.expect("readyz B").status, 503);
    assert_eq!(read_file(&db, "token"), None, "B has no token file while waiting");

    // Break A: A drops readiness and its files; B is granted.
    let out = w
        .env
        .kubelock(Identity::Requester1, "break")
        .args(["break", "active", "--reason", "e2e: move the leader", "--by", "e2e-test"])
        .output(TIMEOUT)
        .await
        .success("kubelock break");
    assert!(out.stdout.contains(&a_request), "{}", out.stdout);
    await_ready(pa, 503, "A not ready after the break", TIMEOUT).await;
    // /readyz checks the grant on every call; the files follow within moments.
    eventually("A's token file gone after the loss", Duration::from_secs(5), || async {
        match read_file(&da, "token") {
            None => Ok(()),
            Some(t) => Err(format!("token file still holds {t}")),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    await_ready(pb, 200, "B ready after the break", TIMEOUT).await;
    let broken = wait_until(&requests, &a_request, "A's old request expired", TIMEOUT, |r| r.phase() == Phase::Expired)
        .await
        .expect("A's old request expired");
    let msg = broken.status.and_then(|s| s.message).unwrap_or_default();
    assert!(msg.contains("e2e-test") && msg.contains("e2e: move the leader"), "{msg}");
    // A stands by again with a new request.
    eventually("A waiting again", TIMEOUT, || async {
        let s = status_json(pa).await?;
        if s["state"] == "waiting" && s["request"].as_str().is_some_and(|r| r != a_request) {
            Ok(())
        } else {
            Err(s.to_string())
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    // SIGTERM B: the pod's app has stopped (nothing runs an unscheduled pod), so B releases
    // at once, exits 0, and A is granted.
    let b_request = status_json(pb).await.expect("status of B")["request"].as_str().expect("request").to_string();
    let t = Instant::now();
    b.signal(Signal::TERM);
    let handover = await_ready(pa, 200, "A ready after B's SIGTERM", TIMEOUT).await;
    let status = b.wait(TIMEOUT).await;
    assert_eq!(code(status, "sidecar B", &b), 0);
    // Marked released by B; the controller deletes it after the grant it frees (A may be
    // ready a moment before the delete lands).
    crate::support::wait_gone(&requests, &b_request, TIMEOUT).await.expect("B's request deleted by the controller");
    assert_eq!(read_file(&db, "token"), None);
    assert!(handover < Duration::from_secs(3), "handover after SIGTERM took {handover:?}");
    eprintln!(
        "sidecar: SIGTERM of the holder -> next sidecar's /readyz 200 in {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
}

/// `kubelock acquire --wait --dir` (an init container) leaves a granted request that the
/// sidecar adopts: same request, same token, ready at once.
#[tokio::test]
async fn sidecar_adopts_the_request_of_an_init_container() {
    let w = world(&[("active", 1, "10s", "0s")]).await;
    let dir = w.path("shared");
    let uid = create_pod(&w.env.api(Identity::Admin).await, "pod-i").await.uid().expect("uid");
    let out = w
        .env
        .kubelock(Identity::Requester1, "init")
        .env("POD_NAME", "pod-i")
        .env("POD_UID", &uid)
        .args(["acquire", "active", "--wait", "--wait-timeout", "20s", "-o", "json", "--dir"])
        .arg(&dir)
        .output(TIMEOUT)
        .await
        .success("kubelock acquire --wait");
    let acquired: serde_json::Value = serde_json::from_str(&out.stdout).expect("json output");
    assert_eq!(acquired["granted"], true, "{acquired}");
    let request = acquired["request"].as_str().expect("request").to_string();
    assert_eq!(read_file(&dir, "request").as_deref(), Some(request.as_str()));
    // No token file from a process that does not renew: the sidecar writes it once it has.
    assert_eq!(read_file(&dir, "token"), None);
    assert_eq!(read_file(&dir, "state"), None);

    let port = free_port();
    let _s = w
        .env
        .kubelock(Identity::Requester1, "sidecar")
        .env("POD_NAME", "pod-i")
        .env("POD_UID", &uid)
        .args(["sidecar", "--lock", "active", "--listen", &format!("127.0.0.1:{port}"), "--dir"])
        .arg(&dir)
        .spawn();
    await_ready(port, 200, "the sidecar ready with the adopted request", TIMEOUT).await;
    let st = status_json(port).await.expect("status");
    assert_eq!(st["request"].as_str(), Some(request.as_str()), "{st}");
    assert_eq!(st["token"], acquired["token"], "{st}");
    assert_eq!(read_file(&dir, "token"), Some(acquired["token"].to_string()));
    assert!(read_file(&dir, "deadline").is_some(), "the deadline comes with the token");
    // The sidecar renews the adopted request (it renews at once on adoption).
    let requests = w.requests().await;
    let written_by_init = requests.get(&request).await.expect("request").spec.renew_time;
    let renewed =
        wait_until(&requests, &request, "a renewal by the sidecar", TIMEOUT, |r| r.spec.renew_time != written_by_init)
            .await
            .expect("renewed");
    assert_eq!(renewed.phase(), Phase::Granted);
    assert_eq!(http_get(port, "/readyz").await.expect("readyz").status, 200);
}

/// `kubectl lock ...`: the binary invoked as kubectl-lock honours --kubeconfig, --context, -n.
#[tokio::test]
async fn kubectl_plugin_status_and_list() {
    let w = world(&[("plug", 2, "10s", "0s")]).await;
    let bin = w.env.log_dir().join("bin");
    std::fs::create_dir_all(&bin).expect("bin dir");
    let plugin = bin.join("kubectl-lock");
    std::os::unix::fs::symlink(KUBELOCK, &plugin).expect("symlink kubectl-lock");
    let kubeconfig = w.env.kubeconfig(Identity::Requester1);
    let plug = |name: &str| w.env.command(name, &plugin).arg("--kubeconfig").arg(&kubeconfig).env_remove("KUBECONFIG");

    let ready = w.path("ready");
    let mut holder = w.run("holder", "plug", &[], &format!("touch {}; sleep 60", ready.display())).spawn();
    eventually("the holder to run", TIMEOUT, || async {
        if ready.exists() { Ok(()) } else { Err(holder.stderr_tail(5)) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    let help = w.env.command("help", &plugin).arg("--help").output(TIMEOUT).await.success("kubectl-lock --help");
    assert!(help.stdout.contains("Usage: kubectl lock"), "{}", help.stdout);

    let out =
        plug("status").args(["-n", w.env.ns(), "status", "plug"]).output(TIMEOUT).await.success("kubectl lock status");
    assert!(out.stdout.contains(&format!("Lock:       {}/plug", w.env.ns())), "{}", out.stdout);
    assert!(out.stdout.contains("Permits:    2 (1 held)"), "{}", out.stdout);
    assert!(out.stdout.contains("REQUEST") && out.stdout.contains("plug-"), "{}", out.stdout);

    let out =
        plug("list").args(["list", "-n", w.env.ns(), "-o", "json"]).output(TIMEOUT).await.success("kubectl lock list");
    let list: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(list["items"][0]["metadata"]["name"], "plug", "{list}");
    assert_eq!(list["items"][0]["status"]["holders"].as_array().map(Vec::len), Some(1), "{list}");

    let out = plug("yaml")
        .args(["status", "plug", "-o", "yaml", "--namespace", w.env.ns()])
        .output(TIMEOUT)
        .await
        .success("status -o yaml");
    let lock: Lock = serde_yaml::from_str(&out.stdout).expect("a Lock in YAML");
    assert_eq!(lock.spec.permits, 2);

    // --context is honoured: the kubeconfig's own context works, another name is an error.
    let ctx = Identity::Requester1.user();
    plug("ctx").args(["--context", &ctx, "-n", w.env.ns(), "list"]).output(TIMEOUT).await.success("--context");
    let out = plug("bad-ctx").args(["--context", "no-such-context", "-n", w.env.ns(), "list"]).output(TIMEOUT).await;
    assert_eq!(out.status.and_then(|s| s.code()), Some(1));
    assert!(out.stderr.contains("no-such-context"), "{}", out.stderr);
    // Another namespace has no such lock.
    let out = plug("other-ns").args(["-n", "default", "status", "plug"]).output(TIMEOUT).await;
    assert_ne!(out.status.and_then(|s| s.code()), Some(0), "{}", out.stdout);
    holder.signal(Signal::TERM);
    let _ = holder.wait(TIMEOUT).await;
}

/// The Rust leader-election helper: one leader at a time, a larger token every term, and a
/// stepping-down leader hands over at once.
#[tokio::test]
async fn leader_election_hands_over_with_a_larger_token() {
    let w = world(&[("leader", 1, "6s", "0s")]).await;
    let env = &w.env;
    let elector = |who: &'static str| async move {
        let client = env.client(Identity::Requester1).await;
        let mut opts = AcquireOptions::new("leader");
        opts.holder_identity = who.into();
        LeaderElector::new(LockClient::new(client, env.ns()), opts)
    };
    let (e1, e2) = (elector("one").await, elector("two").await);
    let (mut r1, mut r2) = (e1.subscribe(), e2.subscribe());
    let (s1, s2) = (CancellationToken::new(), CancellationToken::new());
    let t1 = tokio::spawn(e1.run(s1.clone()));
    let first = tokio::time::timeout(TIMEOUT, r1.wait_for(Leadership::is_leading))
        .await
        .expect("one leads")
        .expect("open")
        .clone();
    let t2 = tokio::spawn(e2.run(s2.clone()));
    let locks = w.locks().await;
    wait_until(&locks, "leader", "two queued", TIMEOUT, |l| l.status.as_ref().is_some_and(|s| s.waiting == 1))
        .await
        .expect("queued");
    assert!(!r2.borrow().is_leading(), "two leads while one does");

    let t = Instant::now();
    s1.cancel();
    let second = tokio::time::timeout(TIMEOUT, r2.wait_for(Leadership::is_leading))
        .await
        .expect("two leads")
        .expect("open")
        .clone();
    let handover = t.elapsed();
    assert!(!r1.borrow().is_leading());
    let (Leadership::Leading(Term { token: a, .. }), Leadership::Leading(Term { token: b, .. })) = (first, second)
    else {
        unreachable!()
    };
    assert!(b > a, "tokens {a} then {b}");
    t1.await.expect("join").expect("one stepped down");
    s2.cancel();
    t2.await.expect("join").expect("two stepped down");
    wait_until(&locks, "leader", "free", TIMEOUT, |l| l.granted_permits() == 0).await.expect("released");
    eprintln!("leader election: step-down -> new leader in {:.1} ms", handover.as_secs_f64() * 1e3);
}

/// A term ended by someone else (a break) is not the leader's own release: the leader's app
/// may still act until its local deadline, so the next leader waits for the drain. Before,
/// the helper marked the lost term's request released, which freed the permits at once.
#[tokio::test]
async fn a_broken_leader_term_drains_before_the_next_leader() {
    let w = world(&[("leader", 1, "6s", "0s")]).await;
    let env = &w.env;
    let elector = |who: &'static str| async move {
        let client = env.client(Identity::Requester1).await;
        let mut opts = AcquireOptions::new("leader");
        opts.holder_identity = who.into();
        LeaderElector::new(LockClient::new(client, env.ns()), opts)
    };
    let (e1, e2) = (elector("one").await, elector("two").await);
    let (mut r1, mut r2) = (e1.subscribe(), e2.subscribe());
    let (s1, s2) = (CancellationToken::new(), CancellationToken::new());
    let t1 = tokio::spawn(e1.run(s1.clone()));
    let first = tokio::time::timeout(TIMEOUT, r1.wait_for(Leadership::is_leading))
        .await
        .expect("one leads")
        .expect("open")
        .clone();
    let t2 = tokio::spawn(e2.run(s2.clone()));
    let locks = w.locks().await;
    wait_until(&locks, "leader", "two queued", TIMEOUT, |l| l.status.as_ref().is_some_and(|s| s.waiting == 1))
        .await
        .expect("queued");
    let Leadership::Leading(term) = first else { unreachable!() };
    // Its app may act until this deadline at least (renewals only move it later).
    let deadline = term.deadline().expect("a deadline while leading");
    let brk = serde_json::json!({"metadata": {"annotations": {
        kubelock::api::BREAK_ANNOTATION: "stuck", kubelock::api::BROKEN_BY_ANNOTATION: "admin"}}});
    w.requests()
        .await
        .patch(&term.request, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&brk))
        .await
        .expect("breaking the leader's request");
    tokio::time::timeout(TIMEOUT, r1.wait_for(|l| !l.is_leading())).await.expect("one loses").expect("open");
    tokio::time::timeout(TIMEOUT, r2.wait_for(Leadership::is_leading)).await.expect("two leads").expect("open");
    let early = deadline.saturating_since(kubelock::client::BootInstant::now());
    assert!(early.is_zero(), "two leads {early:?} before the deadline of one's term, which may still act");
    s1.cancel();
    s2.cancel();
    t1.await.expect("join").expect("one stepped down");
    t2.await.expect("join").expect("two stepped down");
}

/// The library's wait: a timeout withdraws the request; a cancelled wait too.
#[tokio::test]
async fn library_acquire_times_out_and_cancels_cleanly() {
    let w = world(&[("lib", 1, "10s", "0s")]).await;
    let client = w.env.client(Identity::Requester1).await;
    let locks = LockClient::new(client, w.env.ns());
    let held = locks.acquire(AcquireOptions::new("lib")).await.expect("first acquire");
    assert!(held.is_holding());
    assert!(held.time_left() > Duration::from_secs(5), "time left {:?}", held.time_left());

    let mut opts = AcquireOptions::new("lib");
    opts.wait_timeout = Some(Duration::from_millis(500));
    let err = locks.acquire(opts).await.expect_err("must time out");
    assert!(matches!(err, kubelock::client::AcquireError::WaitTimeout { .. }), "{err}");

    let cancel = CancellationToken::new();
    let mut opts = AcquireOptions::new("lib");
    opts.cancel = Some(cancel.clone());
    let waiter = tokio::spawn({
        let locks = locks.clone();
        async move { locks.acquire(opts).await }
    });
    let api = w.locks().await;
    wait_until(&api, "lib", "a waiter", TIMEOUT, |l| l.status.as_ref().is_some_and(|s| s.waiting == 1))
        .await
        .expect("waiting");
    cancel.cancel();
    let err = waiter.await.expect("join").expect_err("cancelled");
    assert!(matches!(err, kubelock::client::AcquireError::Cancelled { .. }), "{err}");
    wait_until(&api, "lib", "no waiter", TIMEOUT, |l| l.status.as_ref().is_some_and(|s| s.waiting == 0))
        .await
        .expect("withdrawn");

    let token = held.token();
    held.release().await.expect("release");
    let next = locks.acquire(AcquireOptions::new("lib")).await.expect("acquire after release");
    assert!(next.token() > token);
    next.release().await.expect("release");
}

/// `kubelock acquire` without --wait queues a request and leaves it; `release` finds it by
/// holder (or by name) and deletes it; `break` refuses a lock without holder.
#[tokio::test]
async fn cli_acquire_release_and_break_edge_cases() {
    let w = world(&[("cli", 1, "10s", "0s")]).await;
    let kubelock = |name: &str| w.env.kubelock(Identity::Requester1, name);
    let out = kubelock("acquire").args(["acquire", "cli", "--holder", "batch-7", "-o", "json"]).output(TIMEOUT).await;
    let out = out.success("acquire");
    let created: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    let name = created["request"].as_str().expect("request").to_string();
    let requests = w.requests().await;
    // Nobody renews it; it is granted all the same (the lease then runs out).
    let granted =
        wait_until(&requests, &name, "granted", TIMEOUT, |r| r.phase() == Phase::Granted).await.expect("granted");
    assert_eq!(granted.spec.holder_identity, "batch-7");

    let out = kubelock("release").args(["release", "--lock", "cli", "--holder", "batch-7"]).output(TIMEOUT).await;
    let out = out.success("release by holder");
    // Someone else's request: deleted, its grant drains until its lease passed.
    assert!(out.stdout.contains(&format!("lockrequest {name} deleted")), "{}", out.stdout);
    let locks = w.locks().await;
    wait_until(&locks, "cli", "free", TIMEOUT, |l| l.granted_permits() == 0).await.expect("released");
    let out = kubelock("release-again").args(["release", &name]).output(TIMEOUT).await.success("release again");
    assert!(out.stdout.contains("not found"), "{}", out.stdout);

    let out = kubelock("break").args(["break", "cli", "--reason", "x"]).output(TIMEOUT).await;
    assert_eq!(out.status.and_then(|s| s.code()), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("lock cli has no holder"), "{}", out.stderr);
    let out = kubelock("break-missing").args(["break", "no-such-lock", "--reason", "x"]).output(TIMEOUT).await;
    assert!(out.stderr.contains("lock no-such-lock not found in namespace"), "{}", out.stderr);
}

/// A grant lost to someone else (a break) drains for its lease: the command still gets its
/// `--grace` between SIGTERM and SIGKILL, within the deadline it was given. Before, the lost
/// grant had no deadline any more and the SIGKILL followed the SIGTERM at once.
#[tokio::test]
async fn a_broken_run_gives_its_command_its_grace() {
    let w = world(&[("broken", 1, "30s", "0s")]).await;
    let (marks, tick) = (w.path("marks"), w.path("tick"));
    let script = format!(
        "trap 'echo term $(date +%s%N) >> {m}' TERM; echo start $(date +%s%N) >> {m}; \
         while :; do date +%s%N > {t}.new; mv {t}.new {t}; sleep 0.05; done",
        m = marks.display(),
        t = tick.display()
    );
    let mut run = w.run("run", "broken", &["--grace", "3s"], &script).spawn();
    eventually("the command to start", TIMEOUT, || async {
        let text = std::fs::read_to_string(&marks).unwrap_or_default();
        if text.contains("start") { Ok(()) } else { Err(text) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", run.stderr_tail(20)));
    let lock = w.locks().await.get("broken").await.expect("the Lock");
    let request = lock.status.expect("a status").holders[0].request.clone();
    let brk = serde_json::json!({"metadata": {"annotations": {
        kubelock::api::BREAK_ANNOTATION: "stuck", kubelock::api::BROKEN_BY_ANNOTATION: "admin"}}});
    w.requests()
        .await
        .patch(&request, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&brk))
        .await
        .expect("breaking the request");
    let _ = run.wait(TIMEOUT).await.unwrap_or_else(|| panic!("run did not exit:\n{}", run.stderr_tail(20)));
    let text = std::fs::read_to_string(&marks).unwrap_or_default();
    let term: u128 = text.lines().find_map(|l| l.strip_prefix("term ")?.trim().parse().ok()).unwrap_or_else(|| {
        panic!("the command never ran its SIGTERM trap (killed at once?): {text}\n{}", run.stderr_tail(20))
    });
    let last: u128 = std::fs::read_to_string(&tick).expect("a tick").trim().parse().expect("a time");
    let lived = Duration::from_nanos((last.saturating_sub(term)) as u64);
    assert!(
        lived >= Duration::from_secs(2),
        "the command was killed {lived:?} after its SIGTERM, not given its grace of 3 s:\n{}",
        run.stderr_tail(20)
    );
}
