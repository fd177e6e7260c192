//! The pod a tool runs in and the directory it shares with the app: the downward-API
//! identity (`POD_NAME`, `POD_NAMESPACE`, `POD_UID`), the holder identity `pod/NS/NAME`, and
//! the state directory with its files. Shared by the CLI and the sidecar.

use std::{
    io,
    path::{Path, PathBuf},
};

use crate::{api::PodRef, client::BootInstant};

/// `pod/NS/NAME`: the holder identity of a pod.
pub fn holder_identity(namespace: &str, name: &str) -> String {
    format!("pod/{namespace}/{name}")
}

/// The pod this process runs in, from the downward API (`POD_NAME`, `POD_NAMESPACE`, `POD_UID`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIdentity {
    /// Pod name.
    pub name: String,
    /// Pod namespace, if given.
    pub namespace: Option<String>,
    /// Pod UID, if given.
    pub uid: Option<String>,
}

impl PodIdentity {
    /// Reads the downward-API variables; `None` without `POD_NAME`.
    pub fn from_env() -> Option<Self> {
        let var = |k| std::env::var(k).ok().filter(|v: &String| !v.is_empty());
        // Without POD_NAMESPACE, a pod's namespace is its ServiceAccount's (mounted beside the
        // token): a podRef must never name a pod of another namespace by its name alone.
        let namespace = var("POD_NAMESPACE").or_else(|| {
            let ns = std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace").ok()?;
            Some(ns.trim().to_string()).filter(|n| !n.is_empty())
        });
        Some(Self { name: var("POD_NAME")?, namespace, uid: var("POD_UID") })
    }

    /// `spec.podRef` for this pod.
    pub fn pod_ref(&self) -> PodRef {
        PodRef { name: self.name.clone(), uid: self.uid.clone() }
    }

    /// `spec.podRef` for a request in `namespace`: only if the pod is in it (a podRef names
    /// a pod of the request's namespace; a request made elsewhere is bound by its lease).
    pub fn pod_ref_in(&self, namespace: &str) -> Option<PodRef> {
        self.namespace.as_deref().is_none_or(|ns| ns == namespace).then(|| self.pod_ref())
    }

    /// `pod/NS/NAME`.
    pub fn holder_identity(&self, namespace: &str) -> String {
        holder_identity(self.namespace.as_deref().unwrap_or(namespace), &self.name)
    }
}

/// The directory shared with the app. Every file is replaced atomically.
#[derive(Debug, Clone)]
pub struct StateDir {
    path: PathBuf,
}

/// File names in the state directory.
pub mod files {
    /// Name of the LockRequest owned by this pod.
    pub const REQUEST: &str = "request";
    /// Fencing token, only while holding (and only written by a process that renews).
    pub const TOKEN: &str = "token";
    /// While holding: the local deadline past which the token must not be used, as
    /// `<CLOCK_BOOTTIME seconds> <wall-clock RFC 3339 hint>`. Compare the first field with
    /// the first field of `/proc/uptime` (also CLOCK_BOOTTIME, the same in every container
    /// of the machine); the wall-clock time is for people. Rewritten at every renewal.
    pub const DEADLINE: &str = "deadline";
    /// The Lock's UID, only while holding.
    pub const LOCK_UID: &str = "lock-uid";
    /// `waiting` or `holding`.
    pub const STATE: &str = "state";
}

impl StateDir {
    /// Uses (and creates) `path`.
    pub fn create(path: impl Into<PathBuf>) -> io::Result<Self> {
        let path = path.into();
        std::fs::create_dir_all(&path)?;
        Ok(Self { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `name` atomically (temporary file in the same directory, fsync, rename).
    pub fn write(&self, name: &str, contents: &str) -> io::Result<()> {
        use std::io::Write as _;
        let tmp = self.path.join(format!(".{name}.tmp.{}", std::process::id()));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(contents.as_bytes())?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, self.path.join(name))
    }

    /// Reads `name`, trimmed; `None` if absent or empty.
    pub fn read(&self, name: &str) -> io::Result<Option<String>> {
        match std::fs::read_to_string(self.path.join(name)) {
            Ok(s) if s.trim().is_empty() => Ok(None),
            Ok(s) => Ok(Some(s.trim().to_string())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Removes `name` (absent is fine).
    pub fn remove(&self, name: &str) -> io::Result<()> {
        match std::fs::remove_file(self.path.join(name)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Holding: the deadline, token and lock UID first, then the state.
    pub fn write_holding(&self, request: &str, token: i64, lock_uid: &str, deadline: BootInstant) -> io::Result<()> {
        self.write(files::REQUEST, &format!("{request}\n"))?;
        self.write_deadline(deadline)?;
        self.write(files::TOKEN, &format!("{token}\n"))?;
        self.write(files::LOCK_UID, &format!("{lock_uid}\n"))?;
        self.write(files::STATE, "holding\n")
    }

    /// The local deadline while holding (see [`files::DEADLINE`]).
    pub fn write_deadline(&self, deadline: BootInstant) -> io::Result<()> {
        let since_boot = deadline.since_boot();
        let left = deadline.saturating_since(BootInstant::now());
        let wall = jiff::Timestamp::now().saturating_add(jiff::SignedDuration::try_from(left).unwrap_or_default());
        let wall = wall.unwrap_or(jiff::Timestamp::MAX);
        self.write(files::DEADLINE, &format!("{}.{:09} {wall}\n", since_boot.as_secs(), since_boot.subsec_nanos()))
    }

    /// Not holding: the token and its deadline go first.
    pub fn write_not_holding(&self, request: Option<&str>) -> io::Result<()> {
        self.remove(files::TOKEN)?;
        self.remove(files::LOCK_UID)?;
        self.remove(files::DEADLINE)?;
        self.write(files::STATE, "waiting\n")?;
        match request {
            Some(r) => self.write(files::REQUEST, &format!("{r}\n")),
            None => self.remove(files::REQUEST),
        }
    }

    /// A request for an adopter that renews (the sidecar), written by one that does not
    /// (`kubelock acquire --dir`): the request only, never a token or `state=holding`.
    pub fn write_adoptable(&self, request: &str) -> io::Result<()> {
        self.remove(files::TOKEN)?;
        self.remove(files::LOCK_UID)?;
        self.remove(files::DEADLINE)?;
        self.remove(files::STATE)?;
        self.write(files::REQUEST, &format!("{request}\n"))
    }

    /// Removes every file (on exit).
    pub fn clear(&self) -> io::Result<()> {
        self.remove(files::TOKEN)?;
        self.remove(files::LOCK_UID)?;
        self.remove(files::DEADLINE)?;
        self.remove(files::STATE)?;
        self.remove(files::REQUEST)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_dir_writes_and_removes_atomically() {
        let tmp = std::env::temp_dir().join(format!("kubelock-statedir-{}", std::process::id()));
        let dir = StateDir::create(&tmp).unwrap();
        let deadline = BootInstant::now().saturating_add(std::time::Duration::from_secs(10));
        dir.write_holding("db-x", 7, "uid-1", deadline).unwrap();
        assert_eq!(dir.read(files::TOKEN).unwrap().as_deref(), Some("7"));
        let written = dir.read(files::DEADLINE).unwrap().unwrap();
        let (boot, wall) = written.split_once(' ').unwrap();
        let boot: f64 = boot.parse().unwrap();
        assert!((boot - deadline.since_boot().as_secs_f64()).abs() < 1e-6, "{written}");
        assert!(wall.parse::<jiff::Timestamp>().is_ok(), "{written}");
        // Comparable with /proc/uptime, which counts on the same clock.
        let uptime: f64 = std::fs::read_to_string("/proc/uptime").unwrap().split(' ').next().unwrap().parse().unwrap();
        assert!(boot > uptime && boot < uptime + 11.0, "deadline {boot}, uptime {uptime}");
        assert_eq!(dir.read(files::STATE).unwrap().as_deref(), Some("holding"));
        dir.write_not_holding(Some("db-y")).unwrap();
        assert_eq!(dir.read(files::TOKEN).unwrap(), None);
        assert_eq!(dir.read(files::LOCK_UID).unwrap(), None);
        assert_eq!(dir.read(files::DEADLINE).unwrap(), None);
        assert_eq!(dir.read(files::REQUEST).unwrap().as_deref(), Some("db-y"));
        assert_eq!(dir.read(files::STATE).unwrap().as_deref(), Some("waiting"));
        dir.clear().unwrap();
        let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().collect();
        assert!(left.is_empty(), "no temporary files left behind: {left:?}");
        std::fs::remove_dir(&tmp).unwrap();
    }

    #[test]
    fn pod_identity() {
        let p = PodIdentity { name: "web-0".into(), namespace: None, uid: Some("u".into()) };
        assert_eq!(p.holder_identity("prod"), "pod/prod/web-0");
        assert_eq!(p.pod_ref(), PodRef { name: "web-0".into(), uid: Some("u".into()) });
        let p = PodIdentity { namespace: Some("jobs".into()), ..p };
        assert_eq!(p.pod_ref_in("jobs"), Some(p.pod_ref()));
        assert_eq!(p.pod_ref_in("ops"), None, "a request in another namespace is not bound to the pod");
        assert_eq!(p.holder_identity("ops"), "pod/jobs/web-0");
    }
}
