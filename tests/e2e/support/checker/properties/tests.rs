//! The checker's own tests: synthetic histories that break each property must fail.

use super::*;
use crate::support::checker::{Fault, RequestVersion};

const S: Duration = Duration::from_secs(1);

fn ms(n: u64) -> At {
    Duration::from_secs(1000) + Duration::from_millis(n)
}

/// Builds histories: a Lock "L" (UID "L1"), requests by name (UID "u-NAME").
struct H {
    log: Log,
    rev: u64,
    lock: LockVersion,
    requests: HashMap<String, RequestVersion>,
}

impl H {
    fn new(permits: i64) -> H {
        let mut log = Log { start: ms(0), ..Default::default() };
        // One controller, up before anything happens.
        log.faults.push(Fault {
            kind: FaultKind::ControllerStart,
            at: ms(0).saturating_sub(10 * S),
            until: None,
            who: "c0".into(),
        });
        let lock = LockVersion { name: "L".into(), uid: "L1".into(), permits, ..Default::default() };
        let mut h = H { log, rev: 100, lock, requests: HashMap::new() };
        h.commit_lock(0);
        h
    }

    fn delay(mut self, d: Duration) -> H {
        self.lock.lock_delay = d;
        self
    }

    fn push(&mut self, at: u64, change: Change) -> u64 {
        self.rev += 1;
        self.log.records.push(Record { rev: self.rev, at: ms(at), change });
        self.rev
    }

    fn commit_lock(&mut self, at: u64) -> u64 {
        let l = self.lock.clone();
        self.push(at, Change::Lock(l))
    }

    /// A request created at `at` ms with creationTimestamp second `ct`.
    fn create(&mut self, at: u64, name: &str, ct: i64, permits: i64) {
        let r = RequestVersion {
            name: name.into(),
            uid: format!("u-{name}"),
            lock: "L".into(),
            permits,
            created: ct,
            create_rev: self.rev + 1,
            generation: 1,
            ..Default::default()
        };
        self.requests.insert(name.into(), r.clone());
        self.push(at, Change::Request(r));
    }

    fn renew(&mut self, at: u64, name: &str) {
        let r = self.requests.get_mut(name).unwrap();
        r.generation += 1;
        let r = r.clone();
        self.push(at, Change::Request(r));
    }

    fn phase(&mut self, at: u64, name: &str, phase: &str, token: Option<i64>) {
        let r = self.requests.get_mut(name).unwrap();
        r.phase = Some(phase.into());
        r.token = token.or(r.token);
        r.lock_uid = Some("L1".into());
        let r = r.clone();
        self.push(at, Change::Request(r));
    }

    fn delete(&mut self, at: u64, name: &str) {
        let r = self.requests.remove(name).unwrap();
        self.push(at, Change::RequestGone { name: r.name, uid: r.uid });
    }

    /// Lock status: grants `name` the next token.
    fn grant(&mut self, at: u64, name: &str) -> i64 {
        let permits = self.requests[name].permits;
        self.lock.fencing += 1;
        let token = self.lock.fencing;
        self.lock.holders.push(HolderEntry {
            request: name.into(),
            request_uid: format!("u-{name}"),
            permits,
            token,
            lease: 10 * S,
        });
        self.commit_lock(at);
        token
    }

    fn ungrant(&mut self, at: u64, name: &str) {
        self.lock.holders.retain(|h| h.request != name);
        self.commit_lock(at);
    }

    /// The request's own release mark (`spec.released`).
    fn mark_released(&mut self, at: u64, name: &str) {
        let r = self.requests.get_mut(name).unwrap();
        r.released = true;
        r.generation += 1;
        let r = r.clone();
        self.push(at, Change::Request(r));
    }

    /// Lock status: `name`'s grant moves from `holders` to `draining`.
    fn drain(&mut self, at: u64, name: &str) {
        let i = self.lock.holders.iter().position(|h| h.request == name).unwrap();
        let h = self.lock.holders.remove(i);
        self.lock.draining.push(h);
        self.commit_lock(at);
    }

    /// Lock status: `name`'s draining grant frees its permits.
    fn undrain(&mut self, at: u64, name: &str) {
        self.lock.draining.retain(|h| h.request != name);
        self.commit_lock(at);
    }

    /// The Lock deleted and created again under the same name, with a new UID and a status
    /// that starts from `fencing`.
    fn recreate(&mut self, at: u64, uid: &str, fencing: i64) {
        let old = std::mem::replace(&mut self.lock.uid, uid.into());
        self.push(at, Change::LockGone { name: self.lock.name.clone(), uid: old });
        self.lock.holders.clear();
        self.lock.draining.clear();
        self.lock.fencing = fencing;
        self.commit_lock(at);
    }

    fn report(&mut self, r: Report) {
        self.log.reports.push(r);
    }

    fn check(&self) -> Result<Summary, Box<Failure>> {
        let mut log = self.log.clone();
        log.end = Some(log.records.last().map_or(ms(0), |r| r.at) + Duration::from_millis(1));
        check(&log, &Bounds::default())
    }

    fn fails(&self, property: &str) -> String {
        match self.check() {
            Ok(s) => panic!("expected a {property} violation, the check passed: {s}"),
            Err(f) => {
                assert!(
                    f.violations.iter().any(|v| v.property == property),
                    "expected a {property} violation, got:\n{f}"
                );
                f.to_string()
            }
        }
    }
}

fn acted(lock: &str, token: i64, from: u64, to: u64) -> Report {
    Report::Acted {
        who: format!("h{token}"),
        lock: lock.into(),
        request: format!("r{token}"),
        token,
        permits: 1,
        from: ms(from),
        to: ms(to),
        steps: 2,
    }
}

/// A clean mutex handover: passes, and counts what it saw.
fn clean() -> H {
    let mut h = H::new(1);
    h.create(10, "a", 1, 1);
    h.create(20, "b", 2, 1);
    h.grant(30, "a");
    h.phase(31, "a", "Granted", Some(1));
    h.report(acted("L", 1, 40, 90));
    h.delete(100, "a");
    h.ungrant(110, "a");
    h.grant(110, "b");
    h.phase(111, "b", "Granted", Some(2));
    h.report(acted("L", 2, 120, 150));
    h.delete(160, "b");
    h.ungrant(170, "b");
    h
}

#[test]
fn a_clean_history_passes() {
    let s = clean().check().unwrap_or_else(|f| panic!("{f}"));
    assert_eq!(s.grants, 2);
    assert_eq!(s.fifo_pairs, 1);
    assert_eq!(s.acted, 2);
    assert_eq!(s.longest_stall, Duration::from_millis(20), "{s}"); // a waited from its creation (10) to its grant (30)
}

#[test]
fn over_grant_is_caught() {
    let mut h = H::new(1);
    h.create(10, "a", 1, 1);
    h.create(20, "b", 1, 1);
    h.grant(30, "a");
    h.grant(40, "b");
    let text = h.fails("capacity");
    assert!(text.contains("2 permits held of 1"), "{text}");
    assert!(text.contains("timeline"), "{text}");
}

#[test]
fn a_token_issued_twice_or_going_back_is_caught() {
    let mut h = H::new(2);
    h.create(10, "a", 1, 1);
    h.create(20, "b", 1, 1);
    h.grant(30, "a");
    h.lock.fencing = 0; // the next grant reuses token 1
    h.grant(40, "b");
    h.fails("tokens");
    let mut h = H::new(1);
    h.create(10, "a", 1, 1);
    h.grant(30, "a");
    h.lock.fencing = 0;
    h.commit_lock(40);
    let text = h.fails("tokens");
    assert!(text.contains("went back"), "{text}");
}

#[test]
fn a_regrant_of_an_ended_request_is_caught() {
    let mut h = H::new(1);
    h.create(10, "a", 1, 1);
    h.grant(30, "a");
    h.ungrant(40, "a");
    h.grant(50, "a");
    h.fails("tokens");
}

#[test]
fn a_grant_mirrored_before_the_cas_is_caught() {
    let mut h = H::new(1);
    h.create(10, "a", 1, 1);
    h.phase(20, "a", "Granted", Some(1));
    h.grant(30, "a");
    h.fails("mirror");
}

#[test]
fn fifo_overtaking_is_caught() {
    let mut h = H::new(1);
    h.create(10, "a", 1, 1);
    h.create(20, "b", 2, 1);
    h.grant(30, "b"); // b (second 2) before a (second 1)
    let text = h.fails("fifo");
    assert!(text.contains("was granted while a"), "{text}");
}

#[test]
fn same_second_requests_are_not_judged() {
    let mut h = H::new(1);
    h.create(10, "a", 1, 1);
    h.create(20, "b", 1, 1);
    h.grant(30, "b");
    h.delete(40, "b");
    h.ungrant(50, "b");
    h.grant(60, "a");
    let s = h.check().unwrap_or_else(|f| panic!("{f}"));
    assert_eq!(s.fifo_pairs, 0);
}

#[test]
fn a_lost_wake_up_is_caught() {
    let mut h = H::new(1);
    h.create(10, "a", 1, 1);
    h.create(20, "b", 2, 1);
    h.grant(30, "a");
    h.mark_released(100, "a");
    // The controller only notices 12 s later.
    h.ungrant(12_100, "a");
    h.grant(12_100, "b");
    let text = h.fails("progress");
    assert!(text.contains("not granted for 12.000s"), "{text}");
}

#[test]
fn a_stall_while_no_controller_runs_is_excused() {
    let mut h = H::new(1);
    h.create(10, "a", 1, 1);
    h.create(20, "b", 2, 1);
    h.grant(30, "a");
    h.log.faults.push(Fault { kind: FaultKind::ControllerKill, at: ms(50), until: None, who: "c0".into() });
    h.mark_released(100, "a");
    h.log.faults.push(Fault { kind: FaultKind::ControllerStart, at: ms(6000), until: None, who: "c1".into() });
    h.ungrant(6500, "a");
    h.grant(6500, "b");
    h.check().unwrap_or_else(|f| panic!("{f}"));
    // Still bounded after the new controller is up.
    let mut late = h.log.clone();
    late.records.truncate(late.records.len() - 2);
    let mut h2 = H { log: late, rev: h.rev, lock: h.lock.clone(), requests: h.requests.clone() };
    h2.lock.holders.clear();
    h2.grant(100 + 8900 + 10_100, "b"); // 8.9 s excused, 10.1 s not
    h2.fails("progress");
}

#[test]
fn an_early_expiry_is_caught() {
    let mut h = H::new(1);
    h.create(10, "a", 1, 1);
    let t = h.grant(30, "a");
    h.report(Report::NotBefore { lock: "L".into(), token: t, at: ms(10_030) });
    h.ungrant(9000, "a"); // the request still exists: ended by the controller
    let text = h.fails("early-expiry");
    assert!(text.contains("1.030s before"), "{text}");
}

#[test]
fn a_late_expiry_is_caught() {
    let mut h = H::new(1);
    h.create(10, "a", 1, 1);
    h.grant(30, "a");
    h.renew(3000, "a");
    h.ungrant(3000 + 10_000 + 11_000, "a"); // renewed at 3 s, 10 s lease, 10 s bound
    h.fails("late-expiry");
    // In time: fine.
    let mut h = H::new(1);
    h.create(10, "a", 1, 1);
    h.grant(30, "a");
    h.renew(3000, "a");
    h.ungrant(13_100, "a");
    h.check().unwrap_or_else(|f| panic!("{f}"));
}

#[test]
fn a_grant_inside_the_lock_delay_is_caught() {
    let mut h = H::new(1).delay(2 * S);
    h.create(10, "a", 1, 1);
    h.create(20, "b", 2, 1);
    h.grant(30, "a");
    h.lock.delayed = true;
    h.ungrant(10_100, "a"); // expired: a still exists
    h.lock.delayed = false;
    h.grant(11_000, "b");
    let text = h.fails("lock-delay");
    assert!(text.contains("inside the 2s lock delay"), "{text}");
}

#[test]
fn acting_after_the_grant_ended_is_caught() {
    let mut h = clean();
    h.report(acted("L", 1, 95, 112)); // a acts after the status without it (t=110)
    let text = h.fails("acting");
    assert!(text.contains("after the recorder saw rev"), "{text}");
}

#[test]
fn acting_with_a_token_never_granted_is_caught() {
    let mut h = clean();
    h.report(acted("L", 7, 10, 20));
    h.fails("acting");
}

#[test]
fn overlapping_holders_are_caught() {
    let mut h = H::new(1);
    h.create(10, "a", 1, 1);
    h.create(20, "b", 2, 1);
    h.grant(30, "a");
    h.ungrant(100, "a");
    h.grant(100, "b");
    // Each within its own grant as the recorder saw it, but overlapping on the holders' clocks.
    h.report(acted("L", 1, 40, 99));
    h.report(acted("L", 2, 98, 120));
    let text = h.fails("exclusion");
    assert!(text.contains("2 permits of 1"), "{text}");
}

#[test]
fn excuse_windows_merge() {
    let mut i = Intervals::default();
    i.add(ms(0), ms(10));
    i.add(ms(5), ms(20));
    i.add(ms(30), ms(40));
    let i = i.merged();
    assert_eq!(i.0.len(), 2);
    assert_eq!(i.overlap(ms(0), ms(35)), Duration::from_millis(25));
    assert!(i.contains(ms(35)));
}

#[test]
fn a_grant_while_another_drains_is_caught() {
    let mut h = H::new(1);
    h.create(10, "a", 1, 1);
    h.create(20, "b", 2, 1);
    h.grant(30, "a");
    h.delete(40, "a"); // by another party: no release mark, the grant drains
    h.drain(50, "a");
    h.grant(60, "b");
    let text = h.fails("capacity");
    assert!(text.contains("2 permits held of 1") && text.contains("draining a"), "{text}");
}

#[test]
fn a_draining_holder_may_act_until_its_grant_leaves_draining() {
    let mut h = H::new(1);
    h.create(10, "a", 1, 1);
    h.create(20, "b", 2, 1);
    h.grant(30, "a");
    h.delete(40, "a");
    h.drain(50, "a");
    h.undrain(200, "a");
    h.grant(200, "b");
    // a acts on after the drain began (it has not seen it yet), and stops before it ended.
    h.report(acted("L", 1, 35, 150));
    h.report(acted("L", 2, 210, 250));
    let s = h.check().unwrap_or_else(|f| panic!("{f}"));
    assert_eq!(s.drained, 1, "{s}");
    // Acting after the drain ended is caught.
    h.report(acted("L", 1, 150, 205));
    let text = h.fails("acting");
    assert!(text.contains("after the recorder saw rev"), "{text}");
}

#[test]
fn a_token_going_back_across_a_recreated_lock_is_caught() {
    let mut h = H::new(1);
    h.create(10, "a", 1, 1);
    h.create(20, "b", 2, 1);
    h.lock.fencing = 1_000;
    h.grant(30, "a"); // token 1001
    h.delete(40, "a");
    h.ungrant(50, "a");
    h.recreate(60, "L2", 0);
    h.grant(70, "b"); // token 1: above nothing of this UID, below 1001 of the name
    let text = h.fails("tokens");
    assert!(text.contains("issued under the name L before"), "{text}");
    // With a floor above what the name issued it passes.
    let mut h = H::new(1);
    h.create(10, "a", 1, 1);
    h.create(20, "b", 2, 1);
    h.lock.fencing = 1_000;
    h.grant(30, "a");
    h.delete(40, "a");
    h.ungrant(50, "a");
    h.recreate(60, "L2", 2_000);
    h.grant(70, "b");
    h.check().unwrap_or_else(|f| panic!("{f}"));
}

#[test]
fn a_waiter_that_marked_its_release_is_not_overtaken() {
    let mut h = H::new(1);
    h.create(10, "a", 1, 1);
    h.create(20, "b", 2, 1);
    h.create(30, "c", 3, 1);
    h.grant(40, "a");
    h.mark_released(50, "b"); // b gave up waiting: marked, not yet deleted by the controller
    h.mark_released(60, "a");
    h.ungrant(70, "a");
    h.grant(70, "c");
    h.check().unwrap_or_else(|f| panic!("{f}"));
    // Without the mark, c overtook b.
    let mut h = H::new(1);
    h.create(10, "a", 1, 1);
    h.create(20, "b", 2, 1);
    h.create(30, "c", 3, 1);
    h.grant(40, "a");
    h.mark_released(60, "a");
    h.ungrant(70, "a");
    h.grant(70, "c");
    h.fails("fifo");
}
