//! The pod a tool runs in and the directory it shares with the app: the downward-API
//! identity (`POD_NAME`, `POD_NAMESPACE`, `POD_UID`), the holder identity `pod/NS/NAME`, and
//! the state directory with its files. Shared by the CLI and the sidecar.

use std::{
    io,
    path::{Path, PathBuf},
};

use crate::api::PodRef;

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
        Some(Self { name: var("POD_NAME")?, namespace: var("POD_NAMESPACE"), uid: var("POD_UID") })
    }

    /// `spec.podRef` for this pod.
    pub fn pod_ref(&self) -> PodRef {
        PodRef { name: self.name.clone(), uid: self.uid.clone() }
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
    /// Fencing token, only while holding.
    pub const TOKEN: &str = "token";
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

    /// Holding: token and lock UID first, then the state.
    pub fn write_holding(&self, request: &str, token: i64, lock_uid: &str) -> io::Result<()> {
        self.write(files::REQUEST, &format!("{request}\n"))?;
        self.write(files::TOKEN, &format!("{token}\n"))?;
        self.write(files::LOCK_UID, &format!("{lock_uid}\n"))?;
        self.write(files::STATE, "holding\n")
    }

    /// Not holding: the token goes first.
    pub fn write_not_holding(&self, request: Option<&str>) -> io::Result<()> {
        self.remove(files::TOKEN)?;
        self.remove(files::LOCK_UID)?;
        self.write(files::STATE, "waiting\n")?;
        match request {
            Some(r) => self.write(files::REQUEST, &format!("{r}\n")),
            None => self.remove(files::REQUEST),
        }
    }

    /// Removes every file (on exit).
    pub fn clear(&self) -> io::Result<()> {
        self.remove(files::TOKEN)?;
        self.remove(files::LOCK_UID)?;
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
        dir.write_holding("db-x", 7, "uid-1").unwrap();
        assert_eq!(dir.read(files::TOKEN).unwrap().as_deref(), Some("7"));
        assert_eq!(dir.read(files::STATE).unwrap().as_deref(), Some("holding"));
        dir.write_not_holding(Some("db-y")).unwrap();
        assert_eq!(dir.read(files::TOKEN).unwrap(), None);
        assert_eq!(dir.read(files::LOCK_UID).unwrap(), None);
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
    }
}
