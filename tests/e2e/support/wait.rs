//! Waiting without sleeping: conditions on one object driven by a watch, and conditions
//! that cannot be watched (processes, files) polled against a deadline. A timeout is an
//! error that says what was awaited and what was seen last.

use std::{fmt::Debug, future::Future, time::Duration};

use futures::StreamExt as _;
use kube::{
    Api, Resource,
    runtime::{WatchStreamExt as _, watcher},
};
use serde::{Serialize, de::DeserializeOwned};
use tokio::time::Instant;

/// A wait that did not end in time.
#[derive(Debug, thiserror::Error)]
#[error("timed out after {timeout:?} waiting for {what}; last seen:\n{last}")]
pub struct WaitError {
    pub what: String,
    pub timeout: Duration,
    pub last: String,
}

/// Watches the object `name` until `cond` holds for it (`None`: it does not exist) and
/// returns it as last seen. Every change is seen: the watch starts with a list and follows
/// every event, retrying (with backoff) if the watch fails.
pub async fn wait_for<K>(
    api: &Api<K>,
    name: &str,
    what: &str,
    timeout: Duration,
    cond: impl Fn(Option<&K>) -> bool,
) -> Result<Option<K>, WaitError>
where
    K: Resource + Clone + Debug + DeserializeOwned + Serialize + Send + 'static,
{
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher(api.clone(), config).default_backoff().boxed();
    let deadline = Instant::now() + timeout;
    let mut current: Option<K> = None;
    let mut listed: Option<K> = None;
    let mut listing = false;
    let mut last_error = None;
    loop {
        let event = match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Some(event)) => event,
            Ok(None) | Err(_) => {
                let mut last = describe(current.as_ref());
                if let Some(e) = last_error {
                    last.push_str(&format!("\n(last watch error: {e})"));
                }
                return Err(WaitError { what: format!("{what} ({name})"), timeout, last });
            }
        };
        match event {
            Ok(watcher::Event::Init) => {
                listing = true;
                listed = None;
            }
            Ok(watcher::Event::InitApply(obj)) => listed = Some(obj),
            Ok(watcher::Event::InitDone) => {
                listing = false;
                current = listed.take();
            }
            Ok(watcher::Event::Apply(obj)) => current = Some(obj),
            Ok(watcher::Event::Delete(_)) => current = None,
            Err(e) => {
                last_error = Some(e.to_string());
                continue;
            }
        }
        // Judge only complete states: not in the middle of a (re)list.
        if !listing && cond(current.as_ref()) {
            return Ok(current);
        }
    }
}

/// Waits until the object exists and `cond` holds for it; returns it.
pub async fn wait_until<K>(
    api: &Api<K>,
    name: &str,
    what: &str,
    timeout: Duration,
    cond: impl Fn(&K) -> bool,
) -> Result<K, WaitError>
where
    K: Resource + Clone + Debug + DeserializeOwned + Serialize + Send + 'static,
{
    let found = wait_for(api, name, what, timeout, |obj| obj.is_some_and(&cond)).await?;
    found.ok_or_else(|| WaitError { what: what.to_string(), timeout, last: "<absent>".into() })
}

/// Waits until the object does not exist.
pub async fn wait_gone<K>(api: &Api<K>, name: &str, timeout: Duration) -> Result<(), WaitError>
where
    K: Resource + Clone + Debug + DeserializeOwned + Serialize + Send + 'static,
{
    wait_for(api, name, "deletion", timeout, |obj| obj.is_none()).await.map(|_| ())
}

/// Polls `check` until it returns `Ok`, with a short growing interval (10 ms to 500 ms),
/// until `timeout`. `Err(reason)` means "not yet"; the last reason is in the timeout error.
/// For what no watch can report: processes, files, ports, metrics.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T, WaitError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    let mut interval = Duration::from_millis(10);
    loop {
        let last = match tokio::time::timeout_at(deadline, check()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(reason)) => reason,
            Err(_) => "the check itself did not finish".into(),
        };
        if Instant::now() + interval >= deadline {
            return Err(WaitError { what: what.to_string(), timeout, last });
        }
        tokio::time::sleep(interval).await;
        interval = (interval * 2).min(Duration::from_millis(500));
    }
}

/// YAML of an object for messages (without managedFields), or `<absent>`.
pub fn describe<K: Resource + Serialize>(obj: Option<&K>) -> String {
    match obj {
        None => "<absent>".into(),
        Some(obj) => super::to_yaml(obj),
    }
}
