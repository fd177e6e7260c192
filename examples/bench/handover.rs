//! Item 3, kubelock handover: the holder marks its LockRequest released → the next waiter observes its
//! grant (first of the Lock watch and its request watch), with `waiters` queued.
//!
//! Between samples the system is brought back to rest without sleeping: the releaser
//! re-queues at the tail and the sample ends only once that request is seen `Pending`
//! (the controller reconciles one Lock at a time, so all writes of the handover's reconcile
//! are done by then).

use std::{collections::VecDeque, time::Instant};

use anyhow::{anyhow, bail};
use kube::{Api, api::PostParams};
use kubelock::api::{Lock, LockRequest};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    Budget,
    requester::{self, GrantWatch, Seen, Via},
    stats::Samples,
};

enum Cmd {
    Join,
    Release,
}

enum Report {
    Queued,
    Granted { at: Instant, wall: jiff::Timestamp, via: Via },
    Released { at: Instant, wall: jiff::Timestamp, took: std::time::Duration },
}

/// The result of one handover configuration.
pub struct Handover {
    pub samples: Samples,
    pub via_lock: usize,
    pub via_request: usize,
    /// Per sample, wall-clock (release sent, grant seen): to line up with controller logs.
    /// and how long the releaser's release mark took.
    pub timeline: Vec<(jiff::Timestamp, jiff::Timestamp, std::time::Duration)>,
}

/// Runs `permits` holders and `waiters` waiters on a fresh Lock `name`.
pub async fn handover(
    locks: &Api<Lock>,
    requests: &Api<LockRequest>,
    name: &str,
    permits: i32,
    waiters: usize,
    budget: Budget,
) -> anyhow::Result<Handover> {
    locks.create(&PostParams::default(), &requester::lock(name, permits, Some("10m"))).await?;
    let clients = permits as usize + waiters;
    let (report_tx, mut reports) = mpsc::unbounded_channel::<(usize, anyhow::Result<Report>)>();
    let mut cmds = Vec::new();
    let mut tasks = Vec::new();
    let stop = CancellationToken::new();
    for id in 0..clients {
        let (tx, rx) = mpsc::unbounded_channel();
        cmds.push(tx);
        tasks.push(tokio::spawn(client(
            id,
            locks.clone(),
            requests.clone(),
            name.to_string(),
            rx,
            report_tx.clone(),
            stop.clone(),
        )));
    }
    let result = async {
        // Fill the lock: holders first, then the queue, one at a time (FIFO order is known).
        let mut holders = VecDeque::new();
        for (id, cmd) in cmds.iter().enumerate() {
            cmd.send(Cmd::Join).map_err(|_| anyhow!("client {id} is gone"))?;
            match next_report(&mut reports).await? {
                (who, Report::Granted { .. }) if who == id => holders.push_back(id),
                (who, Report::Queued) if who == id => {}
                _ => bail!("unexpected report while filling the lock"),
            }
        }
        if holders.len() != permits as usize {
            bail!("{} holders after filling a lock of {permits} permits", holders.len());
        }
        let mut out = Handover { samples: Samples::default(), via_lock: 0, via_request: 0, timeline: Vec::new() };
        let start = Instant::now();
        while !budget.done(start, out.samples.len()) {
            let releaser = holders.pop_front().ok_or_else(|| anyhow!("no holder"))?;
            cmds[releaser].send(Cmd::Release).map_err(|_| anyhow!("client {releaser} is gone"))?;
            let (mut t0, mut grant) = (None, None);
            while t0.is_none() || grant.is_none() {
                match next_report(&mut reports).await? {
                    (who, Report::Released { at, wall, took }) if who == releaser => t0 = Some((at, wall, took)),
                    (who, Report::Granted { at, wall, via }) => grant = Some((who, at, wall, via)),
                    _ => bail!("unexpected report during a handover"),
                }
            }
            let ((t0, wall0, took), (granted, at, wall1, via)) = (
                t0.unwrap_or_else(|| (Instant::now(), jiff::Timestamp::now(), std::time::Duration::ZERO)),
                grant.unwrap_or_else(|| (releaser, Instant::now(), jiff::Timestamp::now(), Via::Lock)),
            );
            out.timeline.push((wall0, wall1, took));
            if at < t0 {
                bail!("client {granted} saw a grant before the release");
            }
            out.samples.push(at - t0);
            match via {
                Via::Lock => out.via_lock += 1,
                Via::Request => out.via_request += 1,
            }
            holders.push_back(granted);
            // Back to rest: the releaser queues again at the tail and sees itself Pending.
            cmds[releaser].send(Cmd::Join).map_err(|_| anyhow!("client {releaser} is gone"))?;
            match next_report(&mut reports).await? {
                (who, Report::Queued) if who == releaser => {}
                _ => bail!("unexpected report while re-queueing"),
            }
        }
        Ok(out)
    }
    .await;
    stop.cancel();
    drop(cmds);
    for t in tasks {
        let _ = t.await;
    }
    result
}

async fn next_report(
    reports: &mut mpsc::UnboundedReceiver<(usize, anyhow::Result<Report>)>,
) -> anyhow::Result<(usize, Report)> {
    match reports.recv().await {
        Some((id, Ok(r))) => Ok((id, r)),
        Some((id, Err(e))) => Err(e.context(format!("client {id}"))),
        None => Err(anyhow!("clients are gone")),
    }
}

/// One requester: joins when told (reports Queued or Granted), releases when told.
async fn client(
    id: usize,
    locks: Api<Lock>,
    requests: Api<LockRequest>,
    lock: String,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    reports: mpsc::UnboundedSender<(usize, anyhow::Result<Report>)>,
    stop: CancellationToken,
) {
    let holder = format!("bench-client-{id}");
    let mut current: Option<LockRequest> = None;
    while let Some(cmd) = tokio::select! { c = cmds.recv() => c, _ = stop.cancelled() => None } {
        let result: anyhow::Result<()> = async {
            match cmd {
                Cmd::Join => {
                    let req = requester::create(&requests, &lock, &holder).await?;
                    let mut watch = GrantWatch::new(&locks, &requests, &lock, &req)?;
                    current = Some(req);
                    if let Seen::Queued = watch.next().await? {
                        let _ = reports.send((id, Ok(Report::Queued)));
                        // A waiter is never told to release: it only waits (or stops).
                        tokio::select! {
                            granted = watch.granted() => {
                                let (at, via) = granted?;
                                let wall = jiff::Timestamp::now();
                                let _ = reports.send((id, Ok(Report::Granted { at, wall, via })));
                            }
                            _ = stop.cancelled() => {}
                        }
                    } else {
                        let grant =
                            Report::Granted { at: Instant::now(), wall: jiff::Timestamp::now(), via: Via::Lock };
                        let _ = reports.send((id, Ok(grant)));
                    }
                }
                Cmd::Release => {
                    let req = current.take().ok_or_else(|| anyhow!("release without a request"))?;
                    let (at, wall) = (Instant::now(), jiff::Timestamp::now());
                    requester::release(&requests, &req).await?;
                    let _ = reports.send((id, Ok(Report::Released { at, wall, took: at.elapsed() })));
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            let _ = reports.send((id, Err(e)));
            return;
        }
    }
    if let Some(req) = current {
        let _ = requester::release(&requests, &req).await;
    }
}
