//! The timeline of a failed check: what the store committed, what the holders reported and
//! which faults were injected, in time order, around the first violations.

use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    time::Duration,
};

use super::{
    At,
    properties::Violation,
    recording::{Change, HolderEntry, Log, Record, Report},
};

pub(super) fn secs(t: At, start: At) -> String {
    if t >= start { format!("{:.3}", (t - start).as_secs_f64()) } else { format!("-{:.3}", (start - t).as_secs_f64()) }
}

pub(super) fn short(uid: &str) -> &str {
    &uid[..uid.len().min(8)]
}

pub(super) fn names(holders: &[HolderEntry]) -> String {
    holders.iter().map(|h| format!("{} t{} p{}", h.request, h.token, h.permits)).collect::<Vec<_>>().join(", ")
}

/// The lines around the first violations: store revisions of the Locks concerned (request
/// renewals left out), holder reports and faults, in time order.
pub(super) fn timeline(log: &Log, records: &[Record], violations: &[Violation]) -> String {
    let locks: HashSet<&str> = violations.iter().map(|v| v.lock.as_str()).collect();
    let first = violations.first().map_or(log.start, |v| v.at);
    let (from, to) = (first.saturating_sub(Duration::from_secs(8)), first + Duration::from_secs(2));
    let mut lines: Vec<(At, u64, String)> = Vec::new();
    let mut last_phase: HashMap<&str, Option<&str>> = HashMap::new();
    let request_lock: HashMap<&str, &str> = records
        .iter()
        .filter_map(|r| match &r.change {
            Change::Request(q) => Some((q.uid.as_str(), q.lock.as_str())),
            _ => None,
        })
        .collect();
    for r in records {
        let text = match &r.change {
            Change::Lock(l) if locks.contains(l.name.as_str()) => Some(format!(
                "rev {:<7} Lock {}: holders=[{}] fencing={} waiting={}{}",
                r.rev,
                l.name,
                names(&l.holders),
                l.fencing,
                l.waiting,
                if l.delayed { " delayed" } else { "" }
            )),
            Change::LockGone { name, .. } if locks.contains(name.as_str()) => {
                Some(format!("rev {:<7} Lock {name} deleted", r.rev))
            }
            Change::Request(q) if locks.contains(q.lock.as_str()) => {
                let before = last_phase.insert(q.uid.as_str(), q.phase.as_deref());
                match before {
                    None => Some(format!(
                        "rev {:<7} request {} created (ct {}s, permits {})",
                        r.rev, q.name, q.created, q.permits
                    )),
                    Some(p) if p != q.phase.as_deref() => Some(format!(
                        "rev {:<7} request {} phase {}{}",
                        r.rev,
                        q.name,
                        q.phase.as_deref().unwrap_or("-"),
                        q.token.map(|t| format!(" token {t}")).unwrap_or_default()
                    )),
                    _ => None,
                }
            }
            Change::RequestGone { name, uid } if request_lock.get(uid.as_str()).is_some_and(|l| locks.contains(l)) => {
                Some(format!("rev {:<7} request {name} deleted", r.rev))
            }
            _ => None,
        };
        if let Some(text) = text {
            lines.push((r.at, r.rev, text));
        }
    }
    for rep in &log.reports {
        let text = match rep {
            Report::Granted { who, lock, request, token, .. } if locks.contains(lock.as_str()) => {
                Some(format!("holder {who}: saw its grant of {lock}, token {token} ({request})"))
            }
            Report::Acted { who, lock, token, from, to, steps, .. } if locks.contains(lock.as_str()) => Some(format!(
                "holder {who}: acted with token {token} from t={} to t={} ({steps} steps)",
                secs(*from, log.start),
                secs(*to, log.start)
            )),
            Report::NotBefore { lock, token, at } if locks.contains(lock.as_str()) => Some(format!(
                "holder of {lock} token {token}: lease runs out no earlier than t={}",
                secs(*at, log.start)
            )),
            Report::Note { who, text, .. } => Some(format!("{who}: {text}")),
            _ => None,
        };
        if let Some(text) = text {
            lines.push((rep.at(), u64::MAX, text));
        }
        if let Report::Acted { who, lock, token, to, .. } = rep
            && locks.contains(lock.as_str())
        {
            lines.push((*to, u64::MAX, format!("holder {who}: last step with token {token}")));
        }
    }
    for f in &log.faults {
        let until = f.until.map(|u| format!(" (until t={})", secs(u, log.start))).unwrap_or_default();
        lines.push((f.at, u64::MAX, format!("FAULT {} {}{until}", f.kind.name(), f.who)));
    }
    lines.sort_by_key(|(at, rev, _)| (*at, *rev));
    let window: Vec<&(At, u64, String)> = lines.iter().filter(|(at, _, _)| *at >= from && *at <= to).collect();
    let skip = window.len().saturating_sub(250);
    let mut out = String::new();
    if skip > 0 {
        let _ = writeln!(out, "  ({skip} earlier lines left out)");
    }
    for (at, _, text) in window.into_iter().skip(skip) {
        let _ = writeln!(out, "  t={:>9} {text}", secs(*at, log.start));
    }
    out
}
