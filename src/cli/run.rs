//! `kubelock run`: a supervisor of the command it runs while holding the lock: it finds the
//! command like execvp, places it in a process group, forwards signals, and stops it when
//! the lock is lost.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use tokio::signal::unix::SignalKind;
use tokio_util::sync::CancellationToken;

use super::{CliError, RequestFlags, usage};
use crate::{
    api::duration,
    client::{
        AcquireError, BootInstant, BootTimer, Guard, LockClient, LostReason, default_margin,
        grace::{check_grace, default_grace, stop_at},
    },
    connect::{ClientArgs, parse_duration},
    tools::{EXIT_CANNOT_EXECUTE, EXIT_LOST, EXIT_NOT_FOUND, EXIT_REJECTED, EXIT_USAGE, EXIT_WAIT_TIMEOUT, flag_of},
};

/// How the command is placed in process groups.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProcessGroup {
    /// `same` when kubelock runs in the foreground of a terminal (so the command can read
    /// the terminal and Ctrl-C/Ctrl-Z work as usual), `own` otherwise.
    #[default]
    Auto,
    /// The command leads its own process group; forwarded signals and the stop on loss go to
    /// the whole group, so the command's own children are stopped too.
    Own,
    /// The command stays in kubelock's process group; signals go to the command's PID only.
    /// What it leaves running when it exits is killed before the release all the same.
    Same,
}

const RUN_HELP: &str = "\
The command runs with KUBELOCK_TOKEN (fencing token: pass it to everything you write),
KUBELOCK_LOCK, KUBELOCK_LOCK_UID, KUBELOCK_REQUEST and KUBELOCK_NAMESPACE set.
The lock is renewed while it runs and released as soon as it exits. If the lock is lost
(expired by the controller, broken, its request deleted), or --grace before the local
lease deadline when renewals have not moved it, the command gets SIGTERM; SIGKILL follows
--grace later, and at the deadline at the latest. SIGINT, SIGTERM, SIGHUP and SIGQUIT are
forwarded to it.

Exit codes:
  the command's own     it exited by itself while the lock was held
  128+N                 it died from signal N
  75                    the lock was lost while it ran
  76                    --wait-timeout passed before the grant (request withdrawn)
  77                    the controller rejected the request (e.g. more permits than the lock has)
  126, 127              the command cannot be executed / was not found (nothing acquired)
  130, 143              interrupted (SIGINT, SIGTERM) while waiting (request withdrawn)
  2                     invalid flags;  1  other errors (cluster unreachable, RBAC)

Example:
  kubelock run --lock db-migrations --lease 15s --wait-timeout 5m -- ./migrate.sh";

/// `kubelock run` flags.
#[derive(clap::Args, Debug)]
#[command(after_help = RUN_HELP)]
pub struct RunArgs {
    /// Lock to hold while the command runs.
    #[arg(long, value_name = "NAME")]
    pub lock: String,
    #[command(flatten)]
    pub request: RequestFlags,
    /// Time the command gets between SIGTERM and SIGKILL. It is sent SIGTERM when the lock is
    /// lost, or this long before the local lease deadline if renewals have not moved it
    /// (the API server unreachable), and SIGKILL at the deadline at the latest: the next
    /// holder may be granted soon after it. Must be shorter than lease − margin − lease/3
    /// (the deadline's headroom between renewals). Default: half of that, at most 10s.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub grace: Option<Duration>,
    /// Process group of the command (see `auto`).
    #[arg(long, value_enum, default_value_t = ProcessGroup::Auto)]
    pub process_group: ProcessGroup,
    /// The command and its arguments (after `--`).
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

/// Finds `program` like execvp does; `Err(code)` with a message printed when it cannot run.
fn resolve_command(program: &OsString) -> Result<PathBuf, ExitCode> {
    use std::os::unix::fs::PermissionsExt as _;
    let executable = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    let path = Path::new(program);
    if path.as_os_str().is_empty() {
        eprintln!("kubelock: the command is empty");
        return Err(ExitCode::from(EXIT_NOT_FOUND));
    }
    if path.components().count() > 1 || program.to_string_lossy().contains('/') {
        if !path.exists() {
            eprintln!("kubelock: {}: no such file", path.display());
            return Err(ExitCode::from(EXIT_NOT_FOUND));
        }
        if !executable(path) {
            eprintln!("kubelock: {}: not an executable file", path.display());
            return Err(ExitCode::from(EXIT_CANNOT_EXECUTE));
        }
        return Ok(path.to_path_buf());
    }
    let search = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    for dir in std::env::split_paths(&search) {
        let candidate = dir.join(path);
        if executable(&candidate) {
            return Ok(candidate);
        }
    }
    eprintln!("kubelock: {}: command not found", path.display());
    Err(ExitCode::from(EXIT_NOT_FOUND))
}

/// `setpriv`, if installed and it can set the parent-death signal: used to give the command
/// the parent-death signal SIGKILL, so that it cannot outlive a wrapper that is itself killed
/// (and stops renewing). BusyBox's applet of that name (alpine, busybox images) has no
/// `--pdeathsig` and refuses it: the command would never start. Its help tells.
async fn setpriv() -> Option<PathBuf> {
    let path = resolve_quiet("setpriv")?;
    let mut probe = tokio::process::Command::new(&path);
    probe.arg("--help").stdin(std::process::Stdio::null()).kill_on_drop(true);
    let help = tokio::time::timeout(Duration::from_secs(2), probe.output()).await.ok()?.ok()?;
    setpriv_sets_pdeathsig(&help.stdout, &help.stderr).then_some(path)
}

/// Whether a `setpriv --help` output offers `--pdeathsig`.
fn setpriv_sets_pdeathsig(stdout: &[u8], stderr: &[u8]) -> bool {
    [stdout, stderr].iter().any(|out| String::from_utf8_lossy(out).contains("--pdeathsig"))
}

fn resolve_quiet(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let search = std::env::var_os("PATH")?;
    std::env::split_paths(&search)
        .map(|d| d.join(name))
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// kubelock runs in the foreground process group of its controlling terminal.
fn in_terminal_foreground() -> bool {
    let stdin = std::io::stdin();
    rustix::termios::isatty(&stdin)
        && rustix::termios::tcgetpgrp(&stdin).is_ok_and(|pgrp| pgrp == rustix::process::getpgrp())
}

/// Where signals to the command go.
#[derive(Debug, Clone, Copy)]
struct Target {
    pid: rustix::process::Pid,
    group: bool,
}

impl Target {
    fn send(self, signal: rustix::process::Signal) {
        let r = if self.group {
            rustix::process::kill_process_group(self.pid, signal)
        } else {
            rustix::process::kill_process(self.pid, signal)
        };
        if let Err(e) = r
            && e != rustix::io::Errno::SRCH
        {
            eprintln!("kubelock: sending signal {} to the command: {e}", signal.as_raw());
        }
    }
}

/// Waits until nothing the command started is left alive, up to the local deadline, and a
/// moment more for what SIGKILL ended to go when the deadline has passed already; true if
/// nothing is left. Polled: no event reports it. What is left is killed: its own process group
/// (when it has one), and every process reparented to kubelock, its subreaper (the command's
/// orphans, whatever their group or session: a `--process-group same` command's background
/// jobs, a worker that called `setsid`).
async fn leftovers_gone_by(target: Target, deadline: BootInstant) -> bool {
    let until = deadline.max(BootInstant::now().saturating_add(std::time::Duration::from_secs(2)));
    let me = rustix::process::getpid();
    loop {
        // Orphans become our children (we are their subreaper, or the pod's PID 1): reap them.
        while let Ok(Some(_)) = rustix::process::wait(rustix::process::WaitOptions::NOHANG) {}
        let group = target.group && group_alive(target.pid);
        if group {
            target.send(rustix::process::Signal::KILL);
        }
        let children = live_children(me);
        for child in &children {
            // Our child until we reap it: its PID cannot be reused meanwhile.
            let _ = rustix::process::kill_process(*child, rustix::process::Signal::KILL);
        }
        if !group && children.is_empty() {
            return true;
        }
        if BootInstant::now() >= until {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// `(state, parent, process group)` of each process, from /proc: zombies do not run (an
/// init that does not reap would keep them forever), so this reads /proc rather than
/// signalling.
fn processes() -> Vec<(rustix::process::Pid, String, i32, i32)> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<i32>().ok().and_then(rustix::process::Pid::from_raw)?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // "PID (COMM) STATE PPID PGRP ...": COMM may hold spaces and parentheses.
            let (_, rest) = stat.rsplit_once(')')?;
            let mut fields = rest.split_whitespace();
            let state = fields.next()?.to_string();
            let parent = fields.next()?.parse().ok()?;
            let group = fields.next()?.parse().ok()?;
            Some((pid, state, parent, group))
        })
        .collect()
}

fn running(state: &str) -> bool {
    !matches!(state, "Z" | "X")
}

/// Our children that still run.
fn live_children(me: rustix::process::Pid) -> Vec<rustix::process::Pid> {
    let me = me.as_raw_nonzero().get();
    processes().into_iter().filter(|(_, state, parent, _)| *parent == me && running(state)).map(|(p, ..)| p).collect()
}

/// Whether a process of group `pgid` still runs.
fn group_alive(pgid: rustix::process::Pid) -> bool {
    if rustix::process::test_kill_process_group(pgid) == Err(rustix::io::Errno::SRCH) {
        return false;
    }
    let pgid = pgid.as_raw_nonzero().get();
    let all = processes();
    // /proc unreadable: assume it runs.
    all.is_empty() || all.iter().any(|(_, state, _, group)| *group == pgid && running(state))
}

/// Signals kubelock forwards to the command.
pub(super) struct Forwarded {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
}

impl Forwarded {
    pub(super) fn install() -> Result<Self, CliError> {
        let s = |k| tokio::signal::unix::signal(k).map_err(CliError::Signals);
        Ok(Self {
            int: s(SignalKind::interrupt())?,
            term: s(SignalKind::terminate())?,
            hup: s(SignalKind::hangup())?,
            quit: s(SignalKind::quit())?,
        })
    }

    pub(super) async fn recv(&mut self) -> rustix::process::Signal {
        use rustix::process::Signal;
        tokio::select! {
            _ = self.int.recv() => Signal::INT,
            _ = self.term.recv() => Signal::TERM,
            _ = self.hup.recv() => Signal::HUP,
            _ = self.quit.recv() => Signal::QUIT,
        }
    }
}

/// The grant's local deadline while it has one, remembered in `last`. A grant lost to someone
/// else (a break, a deleted request) has no deadline any more, but the next holder is only
/// granted once the one it had last has passed (the lock delay of an ended grant covers it):
/// the command keeps its grace up to that deadline. With none ever seen, now.
fn deadline_of(guard: &Guard, last: &mut Option<BootInstant>) -> BootInstant {
    if let Some(d) = guard.deadline() {
        *last = Some(d);
    }
    last.unwrap_or_else(BootInstant::now)
}

fn exit_code_of(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(c), _) => (c & 0xff) as u8,
        (None, Some(sig)) => (128 + sig).min(255) as u8,
        _ => 1,
    }
}

/// `kubelock run --lock NAME -- CMD ARGS...`: acquire, run, release; see the module docs
/// for exit codes.
pub async fn run(args: RunArgs, client_args: &ClientArgs) -> Result<ExitCode, CliError> {
    let Some(program) = args.command.first() else {
        return Ok(usage("no command given (kubelock run --lock NAME -- CMD ARGS...)"));
    };
    let program_path = match resolve_command(program) {
        Ok(p) => p,
        Err(code) => return Ok(code),
    };
    // Bad flags are reported before anything talks to the cluster.
    if let Err(AcquireError::Invalid { field, message }) = args.request.options(&args.lock, "").validate() {
        return Ok(usage(format!("invalid {}: {message}", flag_of(field))));
    }
    let (kube, namespace) = client_args.client().await?;
    let locks = LockClient::new(kube, &namespace).with_request_timeout(client_args.request_timeout);
    let opts = args.request.options(&args.lock, &namespace);
    let mut signals = Forwarded::install()?;

    // 1. Acquire; SIGINT/SIGTERM while waiting withdraw the request.
    let cancel = CancellationToken::new();
    let mut acquire_opts = opts.clone();
    acquire_opts.cancel = Some(cancel.clone());
    let acquiring = locks.acquire(acquire_opts);
    tokio::pin!(acquiring);
    let mut interrupted = None;
    let acquired = loop {
        tokio::select! {
            r = &mut acquiring => break r,
            sig = signals.recv(), if interrupted.is_none() => {
                interrupted = Some(sig);
                cancel.cancel();
            }
        }
    };
    let guard = match acquired {
        Ok(g) => g,
        Err(AcquireError::Cancelled { .. }) => {
            let sig = interrupted.map_or(2, |s| s.as_raw());
            eprintln!("kubelock: interrupted while waiting for lock {}; request withdrawn", args.lock);
            return Ok(ExitCode::from((128 + sig).min(255) as u8));
        }
        Err(e @ AcquireError::WaitTimeout { .. }) => {
            eprintln!("kubelock: {e}; request withdrawn");
            return Ok(ExitCode::from(EXIT_WAIT_TIMEOUT));
        }
        Err(e @ AcquireError::NotGranted { reason: LostReason::Rejected { .. }, .. }) => {
            eprintln!("kubelock: {e}");
            return Ok(ExitCode::from(EXIT_REJECTED));
        }
        Err(e @ AcquireError::NotGranted { .. }) => {
            eprintln!("kubelock: {e}");
            return Ok(ExitCode::from(EXIT_LOST));
        }
        Err(e) => return Err(e.into()),
    };
    // The grace must fit the granted lease: the command must have stopped by the deadline.
    let lease = match guard.current() {
        crate::client::LockState::Holding { lease, .. } => lease,
        _ => Duration::ZERO,
    };
    let margin = args.request.margin.unwrap_or_else(|| default_margin(lease));
    let grace = match args.grace.map(|g| check_grace(g, lease, margin)) {
        None => default_grace(lease, margin),
        Some(Ok(g)) => g,
        Some(Err(why)) => {
            eprintln!("kubelock: invalid --grace: {why}");
            if let Err(e) = guard.release().await {
                eprintln!("kubelock: releasing lock {}: {e}", args.lock);
            }
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };
    tracing::info!(lock = %args.lock, request = %guard.request_name(), token = guard.token(), grace = ?grace, "running the command");

    // 2. Run the command with the token in its environment.
    let terminal_foreground = in_terminal_foreground();
    let own_group = match args.process_group {
        ProcessGroup::Own => true,
        ProcessGroup::Same => false,
        ProcessGroup::Auto => !terminal_foreground,
    };
    let mut command = match setpriv().await {
        Some(setpriv) => {
            let mut c = tokio::process::Command::new(setpriv);
            c.arg("--pdeathsig").arg("KILL").arg("--").arg(&program_path).args(&args.command[1..]);
            c
        }
        None => {
            let mut c = tokio::process::Command::new(&program_path);
            c.args(&args.command[1..]);
            c
        }
    };
    command
        .env("KUBELOCK_TOKEN", guard.token().to_string())
        .env("KUBELOCK_LOCK", &args.lock)
        .env("KUBELOCK_LOCK_UID", guard.lock_uid())
        .env("KUBELOCK_REQUEST", guard.request_name())
        .env("KUBELOCK_NAMESPACE", &namespace);
    if own_group {
        command.process_group(0);
    }
    // What the command leaves behind when it exits (orphans, whatever their process group or
    // session) becomes our child, so that the release waits for it too.
    // Without it (and not PID 1, which they reparent to anyway) they are out of sight: the
    // release cannot know they stopped, so the lock is left to its lease instead.
    let sees_orphans = match rustix::process::set_child_subreaper(Some(rustix::process::getpid())) {
        Ok(()) => true,
        Err(e) => {
            let init = rustix::process::getpid().is_init();
            eprintln!(
                "kubelock: cannot become the subreaper of the command's processes: {e}{}",
                if init { "" } else { "; the lock will be left to its lease when the command ends" }
            );
            init
        }
    };
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kubelock: starting {}: {e}", program_path.display());
            if let Err(e) = guard.release().await {
                eprintln!("kubelock: releasing lock {}: {e}", args.lock);
            }
            let code = if e.kind() == std::io::ErrorKind::NotFound { EXIT_NOT_FOUND } else { EXIT_CANNOT_EXECUTE };
            return Ok(ExitCode::from(code));
        }
    };
    let Some(pid) = child.id().and_then(|p| rustix::process::Pid::from_raw(p as i32)) else {
        eprintln!("kubelock: the command exited before it could be watched");
        let _ = guard.release().await;
        return Ok(ExitCode::FAILURE);
    };
    let target = Target { pid, group: own_group };

    // 3. Wait for the command; stop it if the lock is lost or its deadline nears without a
    // renewal (SIGTERM, then SIGKILL `grace` later and at the deadline at the latest);
    // forward signals. Timers on CLOCK_BOOTTIME, like the deadline.
    let mut lost: Option<LostReason> = None;
    let mut term_timer = BootTimer::new().map_err(CliError::Signals)?;
    let mut kill_timer = BootTimer::new().map_err(CliError::Signals)?;
    let mut kill_at: Option<BootInstant> = None;
    let mut states = guard.state();
    let mut last_deadline = guard.deadline();
    let status = loop {
        if kill_at.is_none() {
            // Not stopping yet: SIGTERM `grace` before the deadline as renewals keep it.
            let term_at = guard.deadline().map(|d| stop_at(d, grace));
            term_timer.set(term_at).map_err(CliError::Signals)?;
        }
        kill_timer.set(kill_at).map_err(CliError::Signals)?;
        tokio::select! {
            biased;
            reason = guard.lost(), if lost.is_none() => {
                let deadline = deadline_of(&guard, &mut last_deadline);
                let at = kill_at.unwrap_or_else(|| BootInstant::now().saturating_add(grace)).min(deadline);
                if kill_at.is_none() {
                    eprintln!(
                        "kubelock: lock {} lost ({reason}); stopping the command (SIGTERM, SIGKILL within {})",
                        args.lock, duration::format(at.saturating_since(BootInstant::now()))
                    );
                    target.send(rustix::process::Signal::TERM);
                }
                kill_at = Some(at);
                term_timer.set(None).map_err(CliError::Signals)?;
                lost = Some(reason);
            }
            _ = term_timer.fired(), if kill_at.is_none() && term_timer.armed().is_some() => {
                // Renewals have not moved the deadline: stop while the grant still holds.
                let deadline = deadline_of(&guard, &mut last_deadline);
                eprintln!(
                    "kubelock: lock {}: no renewal succeeded and the lease deadline is {} away; stopping the command (SIGTERM, SIGKILL at the deadline)",
                    args.lock, duration::format(deadline.saturating_since(BootInstant::now()))
                );
                target.send(rustix::process::Signal::TERM);
                kill_at = Some(deadline);
                term_timer.set(None).map_err(CliError::Signals)?;
                lost.get_or_insert(LostReason::DeadlinePassed);
            }
            _ = kill_timer.fired(), if kill_timer.armed().is_some() => {
                eprintln!("kubelock: the command did not stop in time; sending SIGKILL");
                target.send(rustix::process::Signal::KILL);
                break child.wait().await; // killed: nothing more to time
            }
            _ = states.changed() => {
                // A renewal moved the deadline: remember it and re-arm.
                deadline_of(&guard, &mut last_deadline);
            }
            status = child.wait() => break status,
            sig = signals.recv() => {
                // Sharing the terminal's foreground group, the command got Ctrl-C/Ctrl-\ from
                // the terminal already: forwarding would deliver it twice.
                let from_terminal_too = !own_group
                    && terminal_foreground
                    && matches!(sig, rustix::process::Signal::INT | rustix::process::Signal::QUIT);
                if !from_terminal_too {
                    target.send(sig);
                }
            }
        }
    };
    let lost = lost.or_else(|| {
        (!guard.is_holding()).then(|| guard.current()).and_then(|s| match s {
            crate::client::LockState::Lost { reason, .. } => Some(reason),
            _ => None,
        })
    });
    let token = guard.token();
    // The release mark frees the permits at once: only once nothing the command started can
    // still act. What it left behind (a shell's workers, a background job, in its group or
    // not) is killed and waited for; what outlives the deadline keeps the lock to its lease.
    if own_group {
        target.send(rustix::process::Signal::KILL);
    }
    let nothing_left = leftovers_gone_by(target, deadline_of(&guard, &mut last_deadline)).await;
    if !sees_orphans {
        guard.detach();
    } else if !nothing_left {
        eprintln!("kubelock: processes the command started still run after its exit; the lock is left to its lease");
        guard.detach();
    } else if let Err(e) = guard.release().await {
        eprintln!("kubelock: releasing lock {}: {e} (the lease will expire)", args.lock);
    }
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            eprintln!("kubelock: waiting for the command: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    if let Some(reason) = lost {
        eprintln!(
            "kubelock: exiting {EXIT_LOST}: lock {} (token {token}) was lost while the command ran: {reason}; the command ended with {status}",
            args.lock
        );
        return Ok(ExitCode::from(EXIT_LOST));
    }
    Ok(ExitCode::from(exit_code_of(status)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_of_statuses() {
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(exit_code_of(std::process::ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code_of(std::process::ExitStatus::from_raw(9)), 137);
        assert_eq!(exit_code_of(std::process::ExitStatus::from_raw(15)), 143);
    }

    #[test]
    fn only_a_setpriv_with_pdeathsig_is_used() {
        let util_linux = b"Usage:\n setpriv [options] <program> [<argument>...]\n --pdeathsig keep|clear|<signame>\n";
        assert!(setpriv_sets_pdeathsig(util_linux, b""));
        let busybox = b"BusyBox v1.35.0 multi-call binary.\n\nUsage: setpriv [OPTIONS] PROG ARGS\n\n-d,--dump\t\tShow current capabilities\n--nnp,--no-new-privs\n";
        assert!(!setpriv_sets_pdeathsig(b"", busybox));
        assert!(!setpriv_sets_pdeathsig(b"", b""));
    }

    #[test]
    fn resolves_commands_like_execvp() {
        assert!(resolve_command(&"sh".into()).is_ok());
        assert!(resolve_command(&"/bin/sh".into()).is_ok());
        assert!(resolve_command(&"no-such-command-kubelock".into()).is_err());
        let plain = std::env::temp_dir().join(format!("kubelock-not-executable-{}", std::process::id()));
        std::fs::write(&plain, "x").unwrap();
        assert!(resolve_command(&plain.clone().into_os_string()).is_err());
        std::fs::remove_file(&plain).unwrap();
    }
}
