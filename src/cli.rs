//! The command-line tools: `run`, `acquire`, `release`, `status`, `list`, `break`.
//! All of them go through [`crate::client`]. Invoked as `kubectl-lock` the binary is the
//! `kubectl lock` plugin and honours kubectl's `--kubeconfig`, `--context`, `-n`.
//!
//! Exit codes of `kubelock run` (and `acquire --wait`):
//! - the command's own exit code when it exits by itself while the lock is held;
//! - 128+N when the command died from signal N (as shells report it);
//! - [`EXIT_LOST`] (75) when the lock was lost while the command ran (the command is sent
//!   SIGTERM, then SIGKILL after `--grace`);
//! - [`EXIT_WAIT_TIMEOUT`] (76) when `--wait-timeout` passed before the grant;
//! - [`EXIT_REJECTED`] (77) when the controller rejected the request (more permits than the Lock has);
//! - 126/127 when the command cannot be executed / is not found (checked before acquiring);
//! - 130/143 when interrupted (SIGINT/SIGTERM) while waiting for the lock;
//! - 2 for invalid flags, 1 for other errors (API server unreachable, RBAC...).

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use kube::{
    Api, ResourceExt as _,
    api::{ListParams, Patch, PatchParams},
    config::Kubeconfig,
};
use serde::Serialize;
use tokio::signal::unix::SignalKind;
use tokio_util::sync::CancellationToken;

use crate::{
    api::{BREAK_ANNOTATION, BROKEN_BY_ANNOTATION, CLIENT_MANAGER, LOCK_LABEL, Lock, LockRequest, Phase, duration},
    client::{AcquireError, AcquireOptions, ClientError, LockClient, LostReason},
    connect::{ClientArgs, ConnectError, parse_duration},
    sidecar::{PodIdentity, StateDir, files},
};

/// The lock was lost while the command ran.
pub const EXIT_LOST: u8 = 75;
/// `--wait-timeout` passed before the grant.
pub const EXIT_WAIT_TIMEOUT: u8 = 76;
/// The controller rejected the request.
pub const EXIT_REJECTED: u8 = crate::sidecar::EXIT_REJECTED;
/// Invalid flags (same as clap's usage errors).
pub const EXIT_USAGE: u8 = 2;
/// The command was found but cannot be executed.
pub const EXIT_CANNOT_EXECUTE: u8 = 126;
/// The command was not found.
pub const EXIT_NOT_FOUND: u8 = 127;

/// Errors of the CLI commands (exit code 1; the specific codes above are returned as values).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Acquire(#[from] AcquireError),
    #[error("{0}")]
    Usage(String),
    #[error("{what} {name} not found in namespace {namespace}")]
    NotFound { what: &'static str, name: String, namespace: String },
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("installing signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error("encoding output: {0}")]
    Output(String),
}

/// Output format of the read commands.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Output {
    /// Human-readable tables.
    #[default]
    Table,
    /// JSON.
    Json,
    /// YAML.
    Yaml,
}

/// Flags shared by `run` and `acquire`.
#[derive(clap::Args, Debug, Clone)]
pub struct RequestFlags {
    /// Permits to ask for (1 = mutex/reader; the Lock's permits = writer).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..))]
    pub permits: i32,
    /// Lease to ask for (default: the Lock's leaseDuration; capped at it).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub lease: Option<Duration>,
    /// Give up waiting for the grant after this long (default: wait forever).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub wait_timeout: Option<Duration>,
    /// Safety margin taken off the lease for the local deadline (default max(lease/10, 200ms)).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub margin: Option<Duration>,
    /// Holder identity shown in the Lock's status (default: `pod/NS/NAME` with POD_NAME set,
    /// else `HOSTNAME:PID`).
    #[arg(long, value_name = "TEXT")]
    pub holder: Option<String>,
}

impl RequestFlags {
    fn options(&self, lock: &str, namespace: &str) -> AcquireOptions {
        let pod = PodIdentity::from_env();
        let mut o = AcquireOptions::new(lock);
        o.permits = self.permits;
        o.lease = self.lease;
        o.wait_timeout = self.wait_timeout;
        o.margin = self.margin;
        o.pod_ref = pod.as_ref().map(PodIdentity::pod_ref);
        o.holder_identity =
            self.holder.clone().or_else(|| pod.map(|p| p.holder_identity(namespace))).unwrap_or_default();
        o
    }
}

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
    Same,
}

const RUN_HELP: &str = "\
The command runs with KUBELOCK_TOKEN (fencing token: pass it to everything you write),
KUBELOCK_LOCK, KUBELOCK_LOCK_UID, KUBELOCK_REQUEST and KUBELOCK_NAMESPACE set.
The lock is renewed while it runs and released as soon as it exits. If the lock is lost
(lease deadline passed, expired by the controller, broken), the command gets SIGTERM,
then SIGKILL after --grace. SIGINT, SIGTERM, SIGHUP and SIGQUIT are forwarded to it.

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
    /// After the lock is lost: time between SIGTERM and SIGKILL to the command.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub grace: Duration,
    /// Process group of the command (see `auto`).
    #[arg(long, value_enum, default_value_t = ProcessGroup::Auto)]
    pub process_group: ProcessGroup,
    /// The command and its arguments (after `--`).
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

fn usage(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("kubelock: {message}");
    ExitCode::from(EXIT_USAGE)
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

/// `setpriv`, if installed: used to give the command the parent-death signal SIGKILL, so
/// that it cannot outlive a wrapper that is itself killed (and stops renewing).
fn setpriv() -> Option<PathBuf> {
    resolve_quiet("setpriv")
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

/// Signals kubelock forwards to the command.
struct Forwarded {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
}

impl Forwarded {
    fn install() -> Result<Self, CliError> {
        let s = |k| tokio::signal::unix::signal(k).map_err(CliError::Signals);
        Ok(Self {
            int: s(SignalKind::interrupt())?,
            term: s(SignalKind::terminate())?,
            hup: s(SignalKind::hangup())?,
            quit: s(SignalKind::quit())?,
        })
    }

    async fn recv(&mut self) -> rustix::process::Signal {
        use rustix::process::Signal;
        tokio::select! {
            _ = self.int.recv() => Signal::INT,
            _ = self.term.recv() => Signal::TERM,
            _ = self.hup.recv() => Signal::HUP,
            _ = self.quit.recv() => Signal::QUIT,
        }
    }
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
    tracing::info!(lock = %args.lock, request = %guard.request_name(), token = guard.token(), "running the command");

    // 2. Run the command with the token in its environment.
    let terminal_foreground = in_terminal_foreground();
    let own_group = match args.process_group {
        ProcessGroup::Own => true,
        ProcessGroup::Same => false,
        ProcessGroup::Auto => !terminal_foreground,
    };
    let mut command = match setpriv() {
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

    // 3. Wait for the command; stop it if the lock is lost; forward signals.
    let mut lost: Option<LostReason> = None;
    let mut kill_at: Option<tokio::time::Instant> = None;
    let status = loop {
        tokio::select! {
            biased;
            reason = guard.lost(), if lost.is_none() => {
                eprintln!(
                    "kubelock: lock {} lost ({reason}); stopping the command (SIGTERM, SIGKILL after {})",
                    args.lock, duration::format(args.grace)
                );
                target.send(rustix::process::Signal::TERM);
                kill_at = Some(tokio::time::Instant::now() + args.grace);
                lost = Some(reason);
            }
            _ = async { tokio::time::sleep_until(kill_at.expect("set")).await }, if kill_at.is_some() => {
                eprintln!("kubelock: the command did not stop within {}; sending SIGKILL", duration::format(args.grace));
                target.send(rustix::process::Signal::KILL);
                kill_at = None;
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
    if let Err(e) = guard.release().await {
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

/// The flag (or variable) behind an [`AcquireOptions`] field named in a validation error.
fn flag_of(field: &str) -> &'static str {
    crate::sidecar::flag_of(field)
}

/// `kubelock acquire` flags.
#[derive(clap::Args, Debug)]
pub struct AcquireArgs {
    /// Lock to acquire.
    #[arg(value_name = "LOCK", required_unless_present = "lock")]
    pub name: Option<String>,
    /// Lock to acquire (same as the positional LOCK).
    #[arg(long, value_name = "NAME", conflicts_with = "name")]
    pub lock: Option<String>,
    #[command(flatten)]
    pub request: RequestFlags,
    /// Wait until granted, then exit leaving the request in place (its lease runs until
    /// someone adopts and renews it, e.g. `kubelock sidecar` in the same pod).
    #[arg(long)]
    pub wait: bool,
    /// Write `request` (and with --wait `token`, `lock-uid`, `state`) into this directory,
    /// for the sidecar to adopt (an init container's emptyDir).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct AcquireOutput {
    lock: String,
    namespace: String,
    request: String,
    #[serde(rename = "requestUID")]
    request_uid: String,
    granted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<i64>,
    #[serde(rename = "lockUID", skip_serializing_if = "Option::is_none")]
    lock_uid: Option<String>,
}

/// `kubelock acquire LOCK [--wait]`.
pub async fn acquire(args: AcquireArgs, client_args: &ClientArgs) -> Result<ExitCode, CliError> {
    let Some(lock) = args.name.clone().or(args.lock.clone()) else {
        return Ok(usage("acquire: give the lock name (kubelock acquire LOCK)"));
    };
    if let Err(AcquireError::Invalid { field, message }) = args.request.options(&lock, "").validate() {
        return Ok(usage(format!("invalid {}: {message}", flag_of(field))));
    }
    let (kube, namespace) = client_args.client().await?;
    let locks = LockClient::new(kube, &namespace).with_request_timeout(client_args.request_timeout);
    let opts = args.request.options(&lock, &namespace);
    let dir = match &args.dir {
        Some(p) => Some(StateDir::create(p).map_err(|source| CliError::File { path: p.clone(), source })?),
        None => None,
    };
    let file_err = |source| CliError::File { path: args.dir.clone().unwrap_or_default(), source };
    let pending = locks.request(&opts).await?;
    let request = pending.request_name().to_string();
    let request_uid = pending.request_uid().to_string();
    if let Some(d) = &dir {
        d.write_not_holding(Some(&request)).map_err(file_err)?;
    }
    let mut out = AcquireOutput {
        lock: lock.clone(),
        namespace: namespace.clone(),
        request: request.clone(),
        request_uid,
        granted: false,
        token: None,
        lock_uid: None,
    };
    if !args.wait {
        pending.detach();
        print_output(&out, args.output, || format!("lockrequest {request} created for lock {lock} (not waiting)\n"))?;
        return Ok(ExitCode::SUCCESS);
    }
    let cancel = CancellationToken::new();
    let mut signals = Forwarded::install()?;
    let granted = pending.granted(opts.wait_timeout, Some(cancel.clone()));
    tokio::pin!(granted);
    let mut interrupted = None;
    let result = loop {
        tokio::select! {
            r = &mut granted => break r,
            sig = signals.recv(), if interrupted.is_none() => { interrupted = Some(sig); cancel.cancel(); }
        }
    };
    let guard = match result {
        Ok(g) => g,
        Err(e) => {
            if let Some(d) = &dir {
                d.clear().map_err(file_err)?;
            }
            return Ok(match e {
                AcquireError::Cancelled { .. } => {
                    eprintln!("kubelock: interrupted while waiting for lock {lock}; request withdrawn");
                    ExitCode::from((128 + interrupted.map_or(2, |s| s.as_raw())).min(255) as u8)
                }
                e @ AcquireError::WaitTimeout { .. } => {
                    eprintln!("kubelock: {e}; request withdrawn");
                    ExitCode::from(EXIT_WAIT_TIMEOUT)
                }
                e @ AcquireError::NotGranted { reason: LostReason::Rejected { .. }, .. } => {
                    eprintln!("kubelock: {e}");
                    ExitCode::from(EXIT_REJECTED)
                }
                e => return Err(e.into()),
            });
        }
    };
    out.granted = true;
    out.token = Some(guard.token());
    out.lock_uid = Some(guard.lock_uid().to_string());
    if let Some(d) = &dir {
        d.write_holding(&request, guard.token(), guard.lock_uid()).map_err(file_err)?;
    }
    let lease_left = guard.time_left();
    guard.detach();
    print_output(&out, args.output, || {
        format!(
            "lock {lock} acquired: request {request}, token {}; it expires in about {} unless adopted and renewed\n",
            out.token.unwrap_or_default(),
            duration::format(Duration::from_millis(lease_left.as_millis() as u64))
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `kubelock release` flags.
#[derive(clap::Args, Debug)]
pub struct ReleaseArgs {
    /// LockRequests to delete.
    #[arg(value_name = "REQUEST")]
    pub requests: Vec<String>,
    /// Release the request named in DIR/request (written by `acquire --dir` or the sidecar)
    /// and remove the files.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Release every request of this lock held by --holder.
    #[arg(long, value_name = "NAME", requires = "holder")]
    pub lock: Option<String>,
    /// With --lock: the holder identity whose requests to delete.
    #[arg(long, value_name = "TEXT", requires = "lock")]
    pub holder: Option<String>,
}

/// `kubelock release REQUEST... | --dir DIR | --lock NAME --holder ID`.
pub async fn release(args: ReleaseArgs, client_args: &ClientArgs) -> Result<ExitCode, CliError> {
    if args.requests.is_empty() && args.dir.is_none() && args.lock.is_none() {
        return Ok(usage("release: name the LockRequest(s), or give --dir DIR, or --lock NAME --holder ID"));
    }
    let (kube, namespace) = client_args.client().await?;
    let locks = LockClient::new(kube.clone(), &namespace).with_request_timeout(client_args.request_timeout);
    let mut names = args.requests.clone();
    let dir = match &args.dir {
        Some(p) => {
            let d = StateDir::create(p).map_err(|source| CliError::File { path: p.clone(), source })?;
            match d.read(files::REQUEST).map_err(|source| CliError::File { path: p.clone(), source })? {
                Some(r) => names.push(r),
                None => eprintln!("kubelock: {}: no request file; nothing to release there", p.display()),
            }
            Some(d)
        }
        None => None,
    };
    if let (Some(lock), Some(holder)) = (&args.lock, &args.holder) {
        let api: Api<LockRequest> = Api::namespaced(kube, &namespace);
        let list = timed(
            client_args.request_timeout,
            "listing lock requests",
            api.list(&ListParams::default().labels(&format!("{LOCK_LABEL}={lock}"))),
        )
        .await?;
        let before = names.len();
        names.extend(
            list.items
                .iter()
                .filter(|r| r.spec.lock_name == *lock && r.spec.holder_identity == *holder)
                .map(|r| r.name_any()),
        );
        if names.len() == before {
            eprintln!("kubelock: no request of lock {lock} is held or queued by {holder:?}");
        }
    }
    for name in &names {
        if locks.delete_request(name, None).await? {
            println!("lockrequest {name} deleted");
        } else {
            println!("lockrequest {name} not found (already released)");
        }
    }
    if let Some(d) = dir {
        d.clear().map_err(|source| CliError::File { path: d.path().to_path_buf(), source })?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `kubelock status` flags.
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// The Lock.
    #[arg(value_name = "LOCK")]
    pub lock: String,
    /// Output format (json/yaml: the Lock object).
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// `kubelock status LOCK`: holders, tokens, queue.
pub async fn status(args: StatusArgs, client_args: &ClientArgs) -> Result<ExitCode, CliError> {
    let (kube, namespace) = client_args.client().await?;
    let t = client_args.request_timeout;
    let locks: Api<Lock> = Api::namespaced(kube.clone(), &namespace);
    let requests: Api<LockRequest> = Api::namespaced(kube, &namespace);
    let lock = timed(t, "reading the lock", locks.get_opt(&args.lock)).await?.ok_or_else(|| CliError::NotFound {
        what: "lock",
        name: args.lock.clone(),
        namespace: namespace.clone(),
    })?;
    if args.output != Output::Table {
        print_output(&lock, args.output, String::new)?;
        return Ok(ExitCode::SUCCESS);
    }
    let list = timed(
        t,
        "listing lock requests",
        requests.list(&ListParams::default().labels(&format!("{LOCK_LABEL}={}", args.lock))),
    )
    .await?;
    let mut reqs: Vec<LockRequest> = list.items.into_iter().filter(|r| r.spec.lock_name == args.lock).collect();
    reqs.sort_by_key(|r| (r.creation_timestamp(), r.name_any()));
    print!("{}", render_status(&lock, &reqs, jiff::Timestamp::now()));
    Ok(ExitCode::SUCCESS)
}

fn render_status(lock: &Lock, requests: &[LockRequest], now: jiff::Timestamp) -> String {
    let status = lock.status.clone().unwrap_or_default();
    let mut out = String::new();
    out.push_str(&format!("Lock:       {}/{}\n", lock.namespace().unwrap_or_default(), lock.name_any()));
    out.push_str(&format!("UID:        {}\n", lock.uid().unwrap_or_default()));
    out.push_str(&format!(
        "Permits:    {} ({} held)\nLease:      {}\nLock delay: {}\nToken:      {} (last issued)\n",
        lock.spec.permits,
        lock.granted_permits(),
        lock.spec.lease_duration,
        lock.spec.lock_delay,
        status.fencing_token
    ));
    if let Some(until) = &status.delayed_until {
        out.push_str(&format!("Delayed:    until {} (after an expiry)\n", until.0));
    }
    out.push_str(&format!("Holders:    {}\n", status.holders.len()));
    if !status.holders.is_empty() {
        let rows = status
            .holders
            .iter()
            .map(|h| {
                vec![
                    h.request.clone(),
                    h.holder.clone(),
                    h.permits.to_string(),
                    h.token.to_string(),
                    h.lease_duration.clone(),
                    age(now, h.granted_at.0),
                ]
            })
            .collect();
        out.push_str(&indent(&table(&["REQUEST", "HOLDER", "PERMITS", "TOKEN", "LEASE", "GRANTED"], rows)));
    }
    let waiting: Vec<&LockRequest> = requests.iter().filter(|r| r.phase() == Phase::Pending).collect();
    out.push_str(&format!("Waiting:    {}\n", status.waiting.max(waiting.len() as i32)));
    if !waiting.is_empty() {
        let rows = waiting
            .iter()
            .map(|r| {
                let pos = r.status.as_ref().and_then(|s| s.position).map_or("-".into(), |p| p.to_string());
                vec![
                    pos,
                    r.name_any(),
                    r.spec.holder_identity.clone(),
                    r.spec.permits.to_string(),
                    r.creation_timestamp().map_or("-".into(), |t| age(now, t.0)),
                ]
            })
            .collect();
        out.push_str(&indent(&table(&["POSITION", "REQUEST", "HOLDER", "PERMITS", "AGE"], rows)));
    }
    let ended: Vec<&LockRequest> = requests.iter().filter(|r| r.phase().is_final()).collect();
    if !ended.is_empty() {
        out.push_str(&format!("Ended:      {}\n", ended.len()));
        let rows = ended
            .iter()
            .map(|r| {
                let s = r.status.clone().unwrap_or_default();
                vec![
                    r.name_any(),
                    r.phase().to_string(),
                    s.token.map_or("-".into(), |t| t.to_string()),
                    s.message.unwrap_or_default(),
                ]
            })
            .collect();
        out.push_str(&indent(&table(&["REQUEST", "PHASE", "TOKEN", "MESSAGE"], rows)));
    }
    out
}

/// `kubelock list` flags.
#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// Locks of every namespace.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// `kubelock list [-A]`.
pub async fn list(args: ListArgs, client_args: &ClientArgs) -> Result<ExitCode, CliError> {
    let (kube, namespace) = client_args.client().await?;
    let api: Api<Lock> = if args.all_namespaces { Api::all(kube) } else { Api::namespaced(kube, &namespace) };
    let mut list = timed(client_args.request_timeout, "listing locks", api.list(&ListParams::default())).await?;
    list.items.sort_by_key(|l| (l.namespace(), l.name_any()));
    if args.output != Output::Table {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct LockList<'a> {
            api_version: &'static str,
            kind: &'static str,
            items: &'a [Lock],
        }
        print_output(&LockList { api_version: "v1", kind: "List", items: &list.items }, args.output, String::new)?;
        return Ok(ExitCode::SUCCESS);
    }
    if list.items.is_empty() {
        if args.all_namespaces {
            eprintln!("No locks found.");
        } else {
            eprintln!("No locks found in namespace {namespace}.");
        }
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", render_list(&list.items, args.all_namespaces, jiff::Timestamp::now()));
    Ok(ExitCode::SUCCESS)
}

fn render_list(locks: &[Lock], with_namespace: bool, now: jiff::Timestamp) -> String {
    let mut headers = vec![];
    if with_namespace {
        headers.push("NAMESPACE");
    }
    headers.extend(["NAME", "PERMITS", "HELD", "HOLDERS", "TOKEN", "WAITING", "LEASE", "AGE"]);
    let rows = locks
        .iter()
        .map(|l| {
            let s = l.status.clone().unwrap_or_default();
            let holders = if s.holders.is_empty() {
                "<none>".to_string()
            } else {
                s.holders.iter().map(|h| h.holder.as_str()).collect::<Vec<_>>().join(",")
            };
            let mut row = vec![];
            if with_namespace {
                row.push(l.namespace().unwrap_or_default());
            }
            row.extend([
                l.name_any(),
                l.spec.permits.to_string(),
                l.granted_permits().to_string(),
                holders,
                s.fencing_token.to_string(),
                s.waiting.to_string(),
                l.spec.lease_duration.clone(),
                l.creation_timestamp().map_or("-".into(), |t| age(now, t.0)),
            ]);
            row
        })
        .collect();
    table(&headers, rows)
}

/// `kubelock break` flags.
#[derive(clap::Args, Debug)]
pub struct BreakArgs {
    /// The Lock whose holder to break.
    #[arg(value_name = "LOCK")]
    pub lock: String,
    /// The holder's LockRequest (required when the lock has several holders).
    #[arg(long, value_name = "REQUEST")]
    pub request: Option<String>,
    /// Why (recorded in the Event and the request's status).
    #[arg(long, value_name = "TEXT")]
    pub reason: String,
    /// Who breaks it (default: the kubeconfig user, else the context name).
    #[arg(long, value_name = "WHO")]
    pub by: Option<String>,
}

/// Who is breaking: the kubeconfig user of the selected context, else the context name.
fn whoami(client_args: &ClientArgs) -> String {
    let kc = match &client_args.kubeconfig {
        Some(p) if !p.as_os_str().is_empty() => Kubeconfig::read_from(p).ok(),
        _ => Kubeconfig::read().ok(),
    };
    let from_kc = kc.and_then(|kc| {
        let ctx_name = client_args.context.clone().or(kc.current_context.clone())?;
        let ctx = kc.contexts.iter().find(|c| c.name == ctx_name)?;
        let user = ctx.context.as_ref().and_then(|c| c.user.clone()).filter(|u| !u.is_empty());
        Some(user.unwrap_or(ctx_name))
    });
    from_kc
        .or_else(|| PodIdentity::from_env().map(|p| format!("pod/{}", p.name)))
        .or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "unknown".into())
}

/// `kubelock break LOCK --reason TEXT`: annotates the holder's request; the controller
/// expires it (lockDelay applies) and records an Event with who and why.
pub async fn break_lock(args: BreakArgs, client_args: &ClientArgs) -> Result<ExitCode, CliError> {
    if args.reason.trim().is_empty() {
        return Ok(usage("break: --reason must not be empty (it is recorded with the break)"));
    }
    let (kube, namespace) = client_args.client().await?;
    let t = client_args.request_timeout;
    let locks: Api<Lock> = Api::namespaced(kube.clone(), &namespace);
    let requests: Api<LockRequest> = Api::namespaced(kube, &namespace);
    let lock = timed(t, "reading the lock", locks.get_opt(&args.lock)).await?.ok_or_else(|| CliError::NotFound {
        what: "lock",
        name: args.lock.clone(),
        namespace: namespace.clone(),
    })?;
    let holders = lock.status.clone().unwrap_or_default().holders;
    let holder = match &args.request {
        Some(r) => match holders.iter().find(|h| h.request == *r) {
            Some(h) => h.clone(),
            None => {
                return Err(CliError::Usage(format!(
                    "request {r} does not hold lock {} (holders: {})",
                    args.lock,
                    names_of(&holders)
                )));
            }
        },
        None => match holders.as_slice() {
            [] => return Err(CliError::Usage(format!("lock {} has no holder: nothing to break", args.lock))),
            [h] => h.clone(),
            many => {
                return Err(CliError::Usage(format!(
                    "lock {} has {} holders ({}): choose one with --request",
                    args.lock,
                    many.len(),
                    names_of(many)
                )));
            }
        },
    };
    let who = args.by.clone().unwrap_or_else(|| whoami(client_args));
    let patch = serde_json::json!({
        "metadata": {
            "uid": holder.request_uid,
            "annotations": { BREAK_ANNOTATION: args.reason, BROKEN_BY_ANNOTATION: who },
        }
    });
    let params = PatchParams { field_manager: Some(CLIENT_MANAGER.into()), ..Default::default() };
    match timed(t, "annotating the holder's request", requests.patch(&holder.request, &params, &Patch::Merge(&patch)))
        .await
    {
        Ok(_) => {}
        Err(ClientError::Api { source: kube::Error::Api(s), .. }) if s.code == 404 || s.code == 409 => {
            return Err(CliError::Usage(format!(
                "request {} no longer exists (released meanwhile?): nothing to break",
                holder.request
            )));
        }
        Err(e) => return Err(e.into()),
    }
    println!(
        "lock {}: break of request {} (holder {}, token {}) requested by {who}: {:?}; the controller expires it",
        args.lock, holder.request, holder.holder, holder.token, args.reason
    );
    Ok(ExitCode::SUCCESS)
}

fn names_of(holders: &[crate::api::Holder]) -> String {
    if holders.is_empty() {
        return "none".into();
    }
    holders.iter().map(|h| format!("{} ({})", h.request, h.holder)).collect::<Vec<_>>().join(", ")
}

/// One API call bounded by the request timeout.
async fn timed<T>(
    timeout: Duration,
    op: &'static str,
    fut: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, ClientError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(ClientError::Api { op, source }),
        Err(_) => Err(ClientError::Timeout { op, after: timeout }),
    }
}

fn print_output<T: Serialize>(value: &T, output: Output, table: impl FnOnce() -> String) -> Result<(), CliError> {
    match output {
        Output::Table => print!("{}", table()),
        Output::Json => {
            let s = serde_json::to_string_pretty(value).map_err(|e| CliError::Output(e.to_string()))?;
            println!("{s}");
        }
        Output::Yaml => {
            let s = serde_yaml::to_string(value).map_err(|e| CliError::Output(e.to_string()))?;
            print!("{s}");
        }
    }
    Ok(())
}

/// A kubectl-style table: upper-case headers, columns separated by three spaces.
fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}   ", w = widths[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(headers.to_vec());
    for row in &rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

/// kubectl-style age: `45s`, `3m`, `5h`, `2d`.
fn age(now: jiff::Timestamp, then: jiff::Timestamp) -> String {
    let secs = now.duration_since(then).as_secs().max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    use super::*;
    use crate::api::{Holder, LockSpec, LockStatus};

    #[test]
    fn tables_align() {
        let t = table(&["NAME", "TOKEN"], vec![vec!["a-long-name".into(), "1".into()], vec!["b".into(), "22".into()]]);
        assert_eq!(t, "NAME          TOKEN\na-long-name   1\nb             22\n");
    }

    #[test]
    fn ages() {
        let now = jiff::Timestamp::from_second(1_000_000).unwrap();
        let ago = |s: i64| jiff::Timestamp::from_second(1_000_000 - s).unwrap();
        assert_eq!(age(now, ago(5)), "5s");
        assert_eq!(age(now, ago(300)), "5m");
        assert_eq!(age(now, ago(3 * 3600)), "3h");
        assert_eq!(age(now, ago(3 * 86400)), "3d");
        assert_eq!(age(now, jiff::Timestamp::from_second(1_000_010).unwrap()), "0s");
    }

    #[test]
    fn exit_codes_of_statuses() {
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(exit_code_of(std::process::ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code_of(std::process::ExitStatus::from_raw(9)), 137);
        assert_eq!(exit_code_of(std::process::ExitStatus::from_raw(15)), 143);
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

    fn sample_lock() -> Lock {
        let mut l = Lock::new("db", LockSpec { permits: 3, ..Default::default() });
        l.metadata.namespace = Some("prod".into());
        l.metadata.uid = Some("uid-1".into());
        l.status = Some(LockStatus {
            fencing_token: 12,
            waiting: 1,
            holders: vec![Holder {
                request: "db-abcde".into(),
                request_uid: "r1".into(),
                holder: "pod/prod/web-0".into(),
                permits: 1,
                token: 12,
                granted_at: MicroTime(jiff::Timestamp::from_second(999_990).unwrap()),
                lease_duration: "30s".into(),
            }],
            ..Default::default()
        });
        l
    }

    #[test]
    fn status_rendering() {
        let now = jiff::Timestamp::from_second(1_000_000).unwrap();
        let s = render_status(&sample_lock(), &[], now);
        assert!(s.contains("Lock:       prod/db\n"), "{s}");
        assert!(s.contains("Permits:    3 (1 held)\n"), "{s}");
        assert!(s.contains("Token:      12 (last issued)\n"), "{s}");
        assert!(s.contains("  db-abcde   pod/prod/web-0   1         12      30s     10s\n"), "{s}");
        let l = render_list(&[sample_lock()], true, now);
        assert!(
            l.starts_with("NAMESPACE   NAME   PERMITS   HELD   HOLDERS          TOKEN   WAITING   LEASE   AGE\n"),
            "{l}"
        );
        assert!(
            l.contains("prod        db     3         1      pod/prod/web-0   12      1         30s     -\n"),
            "{l}"
        );
    }
}
