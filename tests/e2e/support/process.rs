//! Child processes for tests: the `kubelock` binary (or anything else) run under
//! `setpriv --pdeathsig KILL` from the long-lived spawner thread, killed and reaped on drop,
//! with output captured in log files that failure dumps print.

use std::{
    ffi::{OsStr, OsString},
    fs,
    path::{Path, PathBuf},
    process::{Child, ChildStdout, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use kubelock::devenv::{guarded_command, log_tail, spawn_guarded};

/// The `kubelock` binary built for this test run.
pub const KUBELOCK: &str = env!("CARGO_BIN_EXE_kubelock");

/// Log files of the processes a test spawned, printed when it fails.
pub type LogRegistry = Arc<Mutex<Vec<(String, PathBuf)>>>;

/// A process builder. Output goes to `<log_dir>/<name>.{stdout,stderr}` unless piped.
pub struct Cmd {
    name: String,
    program: OsString,
    args: Vec<OsString>,
    envs: Vec<(OsString, Option<OsString>)>,
    pipe_stdout: bool,
    log_dir: PathBuf,
    registry: Option<LogRegistry>,
}

impl Cmd {
    /// A command for `program`; `name` names its log files.
    pub fn new(name: &str, program: impl AsRef<OsStr>, log_dir: &Path) -> Cmd {
        Cmd {
            name: name.to_string(),
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            envs: Vec::new(),
            pipe_stdout: false,
            log_dir: log_dir.to_path_buf(),
            registry: None,
        }
    }

    /// The `kubelock` binary.
    pub fn kubelock(name: &str, log_dir: &Path) -> Cmd {
        Cmd::new(name, KUBELOCK, log_dir)
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Cmd {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Cmd {
        self.envs.push((key.as_ref().to_owned(), Some(value.as_ref().to_owned())));
        self
    }

    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Cmd {
        self.envs.push((key.as_ref().to_owned(), None));
        self
    }

    /// Pipe stdout (read it with [`Proc::take_stdout`]) instead of logging it to a file.
    pub fn piped_stdout(mut self) -> Cmd {
        self.pipe_stdout = true;
        self
    }

    /// Record the log files here so that a failure dump prints them.
    pub fn register_logs(mut self, registry: LogRegistry) -> Cmd {
        self.registry = Some(registry);
        self
    }

    /// Starts the process. Panics (failing the test) if it cannot be started.
    pub fn spawn(self) -> Proc {
        fs::create_dir_all(&self.log_dir).expect("creating the log directory");
        let stdout_log = self.log_dir.join(format!("{}.stdout", self.name));
        let stderr_log = self.log_dir.join(format!("{}.stderr", self.name));
        let mut cmd = guarded_command(&self.program);
        cmd.args(&self.args).stdin(Stdio::null());
        for (key, value) in &self.envs {
            match value {
                Some(value) => cmd.env(key, value),
                None => cmd.env_remove(key),
            };
        }
        if self.pipe_stdout {
            cmd.stdout(Stdio::piped());
        } else {
            cmd.stdout(fs::File::create(&stdout_log).expect("creating a stdout log"));
        }
        cmd.stderr(fs::File::create(&stderr_log).expect("creating a stderr log"));
        let child = spawn_guarded(cmd).unwrap_or_else(|e| panic!("starting {:?}: {e}", self.program));
        if let Some(registry) = &self.registry {
            let mut logs = registry.lock().unwrap_or_else(|p| p.into_inner());
            if !self.pipe_stdout {
                logs.push((format!("{} stdout", self.name), stdout_log.clone()));
            }
            logs.push((format!("{} stderr", self.name), stderr_log.clone()));
        }
        Proc { name: self.name, child: Some(child), stdout_log: (!self.pipe_stdout).then_some(stdout_log), stderr_log }
    }

    /// Runs to completion (killed after `timeout`) and returns its output.
    pub async fn output(self, timeout: Duration) -> Output {
        let mut proc = self.piped_stdout().spawn();
        let mut stdout = proc.take_stdout().expect("stdout is piped");
        let reader = tokio::task::spawn_blocking(move || {
            let mut buf = Vec::new();
            let _ = std::io::Read::read_to_end(&mut stdout, &mut buf);
            buf
        });
        let status = proc.wait(timeout).await;
        let stdout = reader.await.expect("reading stdout");
        let stderr = fs::read_to_string(&proc.stderr_log).unwrap_or_default();
        Output { status, stdout: String::from_utf8_lossy(&stdout).into_owned(), stderr }
    }
}

/// What a finished process printed.
#[derive(Debug)]
pub struct Output {
    /// `None` if it had to be killed at the timeout.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Panics with its stderr unless it exited with status 0.
    pub fn success(self, what: &str) -> Output {
        match self.status {
            Some(s) if s.success() => self,
            other => panic!("{what}: exited with {other:?}\nstderr:\n{}", self.stderr),
        }
    }
}

/// A running child, SIGKILLed and reaped on drop (and by the kernel if the test process dies).
pub struct Proc {
    name: String,
    child: Option<Child>,
    stdout_log: Option<PathBuf>,
    stderr_log: PathBuf,
}

impl Proc {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its PID (0 once reaped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.as_mut()?.stdout.take()
    }

    /// Sends a signal (e.g. `rustix::process::Signal::TERM`, `STOP`, `CONT`).
    pub fn signal(&self, signal: rustix::process::Signal) {
        if let Some(pid) = self.child.as_ref().and_then(|c| rustix::process::Pid::from_raw(c.id() as i32)) {
            let _ = rustix::process::kill_process(pid, signal);
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The exit status if it has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok()?
    }

    /// Waits up to `timeout` for it to exit (polling); kills it and returns `None` after.
    pub async fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                self.kill();
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The last lines of its stderr log.
    pub fn stderr_tail(&self, lines: usize) -> String {
        log_tail(&self.stderr_log, lines)
    }

    /// The last lines of its stdout log (empty if stdout is piped).
    pub fn stdout_tail(&self, lines: usize) -> String {
        self.stdout_log.as_deref().map(|p| log_tail(p, lines)).unwrap_or_default()
    }

    /// A `kubelock dev` started with piped stdout: the kubeconfig of the line
    /// `export KUBECONFIG=…` it prints once its control plane is ready (within `timeout`).
    pub async fn dev_kubeconfig(&mut self, timeout: Duration) -> PathBuf {
        let stdout = self.take_stdout().expect("piped stdout");
        let export = tokio::time::timeout(
            timeout,
            tokio::task::spawn_blocking(move || {
                use std::io::BufRead as _;
                std::io::BufReader::new(stdout)
                    .lines()
                    .map_while(Result::ok)
                    .find(|l| l.starts_with("export KUBECONFIG="))
            }),
        )
        .await
        .unwrap_or_else(|_| panic!("{} not ready in {timeout:?}:\n{}", self.name, self.stderr_tail(30)))
        .expect("reading stdout")
        .unwrap_or_else(|| panic!("{} exited early:\n{}", self.name, self.stderr_tail(30)));
        PathBuf::from(export.trim_start_matches("export KUBECONFIG="))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A process identified by PID and start time (so a reused PID is not mistaken for it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessId {
    pub pid: u32,
    start_time: u64,
}

impl ProcessId {
    /// The process with this PID now, if it exists and is not a zombie.
    pub fn of(pid: u32) -> Option<ProcessId> {
        let (state, start_time) = stat(pid)?;
        (!matches!(state, 'Z' | 'X')).then_some(ProcessId { pid, start_time })
    }

    /// True while that same process runs (a zombie counts as gone).
    pub fn alive(&self) -> bool {
        ProcessId::of(self.pid) == Some(*self)
    }

    /// Its command line, for messages.
    pub fn cmdline(&self) -> String {
        fs::read(format!("/proc/{}/cmdline", self.pid))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " ").trim().to_string())
            .unwrap_or_default()
    }
}

/// (state, start time) from /proc/PID/stat.
fn stat(pid: u32) -> Option<(char, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: parse after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: field 3 is the state, field 22 the start time.
    let state = fields.first()?.chars().next()?;
    let start_time = fields.get(19)?.parse().ok()?;
    Some((state, start_time))
}
