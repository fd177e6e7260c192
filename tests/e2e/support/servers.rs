//! Faults of the local control plane's servers, for the tests only: kill, pause and resume
//! etcd or kube-apiserver, and start them again. The library's control plane only starts,
//! watches and stops them; these controls act on its processes by PID.

use std::time::{Duration, Instant};

use kubelock::devenv::{Component, ControlPlane};

/// How long a killed server may take to be reaped.
const REAP: Duration = Duration::from_secs(10);

/// Fault controls on a [`ControlPlane`] started by this process.
pub trait ServerFaults {
    /// SIGKILLs a server and waits until it is gone.
    fn kill(&self, component: Component) -> Result<(), String>;
    /// Pauses a server (SIGSTOP): it keeps its sockets but answers nothing.
    fn pause(&self, component: Component) -> Result<(), String>;
    /// Resumes a paused server (SIGCONT).
    fn resume(&self, component: Component) -> Result<(), String>;
    /// SIGKILLs kube-apiserver.
    fn kill_apiserver(&self) -> Result<(), String> {
        self.kill(Component::ApiServer)
    }
    /// SIGKILLs etcd.
    fn kill_etcd(&self) -> Result<(), String> {
        self.kill(Component::Etcd)
    }
    /// PID of kube-apiserver while it runs.
    fn apiserver_pid(&self) -> Option<u32>;
    /// PID of etcd while it runs.
    fn etcd_pid(&self) -> Option<u32>;
    /// Starts kube-apiserver again and waits until it is ready.
    async fn start_apiserver(&self) -> Result<(), String>;
    /// Starts etcd again and waits until it serves.
    async fn start_etcd(&self) -> Result<(), String>;
}

fn signal(cp: &ControlPlane, component: Component, signal: rustix::process::Signal) -> Result<(), String> {
    let Some(pid) = cp.pid(component) else { return Ok(()) };
    let pid = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw).ok_or("invalid pid")?;
    match rustix::process::kill_process(pid, signal) {
        Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(e) => Err(format!("signalling {component}: {e}")),
    }
}

impl ServerFaults for ControlPlane {
    fn kill(&self, component: Component) -> Result<(), String> {
        signal(self, component, rustix::process::Signal::KILL)?;
        let deadline = Instant::now() + REAP;
        while self.pid(component).is_some() {
            if Instant::now() >= deadline {
                return Err(format!("{component} still running {REAP:?} after SIGKILL"));
            }
            std::thread::sleep(Duration::from_millis(10)); // polling the reaped status
        }
        Ok(())
    }

    fn pause(&self, component: Component) -> Result<(), String> {
        signal(self, component, rustix::process::Signal::STOP)
    }

    fn resume(&self, component: Component) -> Result<(), String> {
        signal(self, component, rustix::process::Signal::CONT)
    }

    fn apiserver_pid(&self) -> Option<u32> {
        self.pid(Component::ApiServer)
    }

    fn etcd_pid(&self) -> Option<u32> {
        self.pid(Component::Etcd)
    }

    async fn start_apiserver(&self) -> Result<(), String> {
        self.restart(Component::ApiServer).await.map_err(|e| e.to_string())
    }

    async fn start_etcd(&self) -> Result<(), String> {
        self.restart(Component::Etcd).await.map_err(|e| e.to_string())
    }
}
