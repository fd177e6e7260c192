//! Tables in kubectl's style: `kubelock status` and `kubelock list`.

use kube::ResourceExt as _;

use crate::api::{Lock, LockRequest, Phase};

pub(super) fn render_status(lock: &Lock, requests: &[LockRequest], now: jiff::Timestamp) -> String {
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

pub(super) fn render_list(locks: &[Lock], with_namespace: bool, now: jiff::Timestamp) -> String {
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
                pod_ref: None,
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
