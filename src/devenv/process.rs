//! Children that die with this process: every one is spawned from one long-lived thread
//! under `setpriv --pdeathsig KILL`, and a reaper process cleans up what they leave behind.

use std::{
    ffi::OsStr,
    fs, io,
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Child, ChildStdin, Command, Stdio},
    sync::{OnceLock, mpsc},
};

use super::{DevError, io_err};

type Job = Box<dyn FnOnce() + Send>;

/// The long-lived thread every guarded child is forked from. It never exits, so the
/// children's parent-death signal fires only when the whole process dies.
fn spawner() -> &'static mpsc::Sender<Job> {
    static SPAWNER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        // If the thread cannot be created, `rx` is dropped and every spawn reports it.
        let _ = std::thread::Builder::new().name("kubelock-spawner".into()).spawn(move || {
            for job in rx {
                job();
            }
        });
        tx
    })
}

/// A command that runs `program` under `setpriv --pdeathsig KILL` in its own process group
/// (so a Ctrl-C meant for the parent reaches the parent alone, which then stops it in order).
/// Spawn it with [`spawn_guarded`].
pub fn guarded_command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--pdeathsig", "KILL", "--"]).arg(program).process_group(0);
    cmd
}

/// Spawns `cmd` (normally from [`guarded_command`]) on the long-lived spawner thread, so
/// that its parent-death signal fires when this process exits, not when the calling thread does.
pub fn spawn_guarded(mut cmd: Command) -> io::Result<Child> {
    let (tx, rx) = mpsc::channel();
    spawner()
        .send(Box::new(move || {
            let _ = tx.send(cmd.spawn());
        }))
        .map_err(|_| io::Error::other("the kubelock-spawner thread is not running"))?;
    rx.recv().map_err(|_| io::Error::other("the kubelock-spawner thread did not answer"))?
}

/// Sends `signal` to `pid` (ignoring a process that is already gone).
pub(super) fn send_signal(pid: u32, signal: rustix::process::Signal) -> io::Result<()> {
    let Some(pid) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) else {
        return Err(io::Error::other(format!("invalid pid {pid}")));
    };
    match rustix::process::kill_process(pid, signal) {
        Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Last `lines` lines of a log file (empty if it cannot be read).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Starts the reaper: `sh` blocked reading a pipe whose only writer is this process. When
/// this process exits, however it dies, the read returns and the reaper removes the state
/// directory (unless `keep_dir`) and the tmpfs etcd data named in it. It runs in its own
/// process group so that a Ctrl-C aimed at us does not reach it.
///
/// With a local node, `node_lock` is the node's lock file: it becomes the reaper's stdout, so
/// that the reaper holds the machine's node lock until it has run the node's cleanup
/// (`node.sh cleanup`, output in [`CLEANUP_LOG`](super::CLEANUP_LOG)); it then removes the
/// directory without crossing into anything still mounted.
pub(super) fn spawn_reaper(
    dir: &Path,
    keep_dir: bool,
    node_lock: Option<fs::File>,
) -> Result<(Child, ChildStdin), DevError> {
    const REAPER: &str = r#"
cat >/dev/null
dir=$1 keep=$2 cleanup_log=$3
rm_flags=-rf
if [ -n "$cleanup_log" ]; then
  rm_flags="-rf --one-file-system"
  if [ -f "$dir/node.sh" ] && [ -d "$dir/node" ]; then
    bash "$dir/node.sh" cleanup "$dir" >"$cleanup_log" 2>&1 </dev/null
  fi
fi
shm=$(cat "$dir/etcd-data-shm" 2>/dev/null || true)
case $shm in /dev/shm/kubelock-etcd.*) ;; *) shm= ;; esac
[ "$keep" = 1 ] && dir=
for _ in 1 2 3 4 5 6 7 8 9 10; do
  rm $rm_flags -- $dir $shm 2>/dev/null
  [ -z "$dir" ] || [ ! -e "$dir" ] || { sleep 0.2; continue; }
  [ -z "$shm" ] || [ ! -e "$shm" ] || { sleep 0.2; continue; }
  exit 0
done
"#;
    let cleanup_log = if node_lock.is_some() { super::CLEANUP_LOG } else { "" };
    let stdout = match node_lock {
        Some(file) => Stdio::from(file),
        None => Stdio::null(),
    };
    let mut child = Command::new("sh")
        .args(["-c", REAPER, "kubelock-reaper"])
        .arg(dir)
        .arg(if keep_dir { "1" } else { "0" })
        .arg(cleanup_log)
        .stdin(Stdio::piped())
        .stdout(stdout)
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(io_err("starting the cleanup process (sh)"))?;
    match child.stdin.take() {
        Some(stdin) => Ok((child, stdin)),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            Err(DevError::Io { what: "starting the cleanup process".into(), source: io::Error::other("no stdin pipe") })
        }
    }
}
