//! The admin commands: `acquire` (create a request, optionally wait, leave it for an
//! adopter), `release`, `status`, `list` and `break`.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use kube::{
    Api, ResourceExt as _,
    api::{ListParams, Patch, PatchParams},
    config::Kubeconfig,
};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::{
    CliError, Output, RequestFlags, print_output,
    run::Forwarded,
    table::{render_list, render_status},
    timed, usage,
};
use crate::{
    api::{BREAK_ANNOTATION, BROKEN_BY_ANNOTATION, CLIENT_MANAGER, LOCK_LABEL, Lock, LockRequest, duration},
    client::{AcquireError, ClientError, LockClient, LostReason},
    connect::ClientArgs,
    pod::{PodIdentity, StateDir, files},
    tools::{EXIT_REJECTED, EXIT_WAIT_TIMEOUT, flag_of},
};

/// `kubelock acquire` flags.
#[derive(clap::Args, Debug)]
pub struct AcquireArgs {
    /// Lock to acquire.
    #[arg(value_name = "LOCK", required_unless_present = "lock")]
    pub name: Option<String>,
    /// Lock to acquire (same as the positional LOCK).
    #[arg(long, value_name = "NAME", conflicts_with = "name")]
    pub lock: Option<String>,
    #[command(flatten)]
    pub request: RequestFlags,
    /// Wait until granted, then exit leaving the request in place (its lease runs until
    /// someone adopts and renews it, e.g. `kubelock sidecar` in the same pod).
    #[arg(long)]
    pub wait: bool,
    /// Write `request` into this directory, for the sidecar to adopt (an init container's
    /// emptyDir). The token files are the adopter's to write: this command does not renew.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct AcquireOutput {
    lock: String,
    namespace: String,
    request: String,
    #[serde(rename = "requestUID")]
    request_uid: String,
    granted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<i64>,
    #[serde(rename = "lockUID", skip_serializing_if = "Option::is_none")]
    lock_uid: Option<String>,
}

/// `kubelock acquire LOCK [--wait]`.
pub async fn acquire(args: AcquireArgs, client_args: &ClientArgs) -> Result<ExitCode, CliError> {
    let Some(lock) = args.name.clone().or(args.lock.clone()) else {
        return Ok(usage("acquire: give the lock name (kubelock acquire LOCK)"));
    };
    if let Err(AcquireError::Invalid { field, message }) = args.request.options(&lock, "").validate() {
        return Ok(usage(format!("invalid {}: {message}", flag_of(field))));
    }
    let (kube, namespace) = client_args.client().await?;
    let locks = LockClient::new(kube, &namespace).with_request_timeout(client_args.request_timeout);
    let opts = args.request.options(&lock, &namespace);
    let dir = match &args.dir {
        Some(p) => Some(StateDir::create(p).map_err(|source| CliError::File { path: p.clone(), source })?),
        None => None,
    };
    let file_err = |source| CliError::File { path: args.dir.clone().unwrap_or_default(), source };
    let pending = locks.request(&opts).await?;
    let request = pending.request_name().to_string();
    let request_uid = pending.request_uid().to_string();
    if let Some(d) = &dir {
        d.write_adoptable(&request).map_err(file_err)?;
    }
    let mut out = AcquireOutput {
        lock: lock.clone(),
        namespace: namespace.clone(),
        request: request.clone(),
        request_uid,
        granted: false,
        token: None,
        lock_uid: None,
    };
    if !args.wait {
        pending.detach();
        print_output(&out, args.output, || format!("lockrequest {request} created for lock {lock} (not waiting)\n"))?;
        return Ok(ExitCode::SUCCESS);
    }
    let cancel = CancellationToken::new();
    let mut signals = Forwarded::install()?;
    let granted = pending.granted(opts.wait_timeout, Some(cancel.clone()));
    tokio::pin!(granted);
    let mut interrupted = None;
    let result = loop {
        tokio::select! {
            r = &mut granted => break r,
            sig = signals.recv(), if interrupted.is_none() => { interrupted = Some(sig); cancel.cancel(); }
        }
    };
    let guard = match result {
        Ok(g) => g,
        Err(e) => {
            if let Some(d) = &dir {
                d.clear().map_err(file_err)?;
            }
            return Ok(match e {
                AcquireError::Cancelled { .. } => {
                    eprintln!("kubelock: interrupted while waiting for lock {lock}; request withdrawn");
                    ExitCode::from((128 + interrupted.map_or(2, |s| s.as_raw())).min(255) as u8)
                }
                e @ AcquireError::WaitTimeout { .. } => {
                    eprintln!("kubelock: {e}; request withdrawn");
                    ExitCode::from(EXIT_WAIT_TIMEOUT)
                }
                e @ AcquireError::NotGranted { reason: LostReason::Rejected { .. }, .. } => {
                    eprintln!("kubelock: {e}");
                    ExitCode::from(EXIT_REJECTED)
                }
                e => return Err(e.into()),
            });
        }
    };
    out.granted = true;
    out.token = Some(guard.token());
    out.lock_uid = Some(guard.lock_uid().to_string());
    // Only the request: the token and `state=holding` are written by the process that keeps
    // renewing (the sidecar that adopts the request), never by one that exits now.
    let lease_left = guard.time_left();
    guard.detach();
    print_output(&out, args.output, || {
        format!(
            "lock {lock} acquired: request {request}, token {}; it expires in about {} unless adopted and renewed\n",
            out.token.unwrap_or_default(),
            duration::format(Duration::from_millis(lease_left.as_millis() as u64))
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `kubelock release` flags: the requester's own release of requests nothing acts on any
/// more (each is marked `spec.released`, then deleted; its permits go to the next waiter at
/// once). To take a lock from a holder that may still act, use `kubelock break`.
#[derive(clap::Args, Debug)]
pub struct ReleaseArgs {
    /// LockRequests to release.
    #[arg(value_name = "REQUEST")]
    pub requests: Vec<String>,
    /// Release the request named in DIR/request (written by `acquire --dir` or the sidecar)
    /// and remove the files.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Release every request of this lock held by --holder (someone else's: each is deleted,
    /// and a grant drains until its holder can no longer act).
    #[arg(long, value_name = "NAME", requires = "holder")]
    pub lock: Option<String>,
    /// With --lock: the holder identity whose requests to release.
    #[arg(long, value_name = "TEXT", requires = "lock")]
    pub holder: Option<String>,
}

/// `kubelock release REQUEST... | --dir DIR | --lock NAME --holder ID`.
pub async fn release(args: ReleaseArgs, client_args: &ClientArgs) -> Result<ExitCode, CliError> {
    if args.requests.is_empty() && args.dir.is_none() && args.lock.is_none() {
        return Ok(usage("release: name the LockRequest(s), or give --dir DIR, or --lock NAME --holder ID"));
    }
    let (kube, namespace) = client_args.client().await?;
    let locks = LockClient::new(kube.clone(), &namespace).with_request_timeout(client_args.request_timeout);
    let mut names = args.requests.clone();
    let dir = match &args.dir {
        Some(p) => {
            let d = StateDir::create(p).map_err(|source| CliError::File { path: p.clone(), source })?;
            match d.read(files::REQUEST).map_err(|source| CliError::File { path: p.clone(), source })? {
                Some(r) => names.push(r),
                None => eprintln!("kubelock: {}: no request file; nothing to release there", p.display()),
            }
            Some(d)
        }
        None => None,
    };
    if let (Some(lock), Some(holder)) = (&args.lock, &args.holder) {
        let api: Api<LockRequest> = Api::namespaced(kube, &namespace);
        let list = timed(
            client_args.request_timeout,
            "listing lock requests",
            api.list(&ListParams::default().labels(&format!("{LOCK_LABEL}={lock}"))),
        )
        .await?;
        let theirs: Vec<String> = list
            .items
            .iter()
            .filter(|r| r.spec.lock_name == *lock && r.spec.holder_identity == *holder)
            .map(|r| r.name_any())
            .collect();
        if theirs.is_empty() {
            eprintln!("kubelock: no request of lock {lock} is held or queued by {holder:?}");
        }
        // Not this process's own grants: deleted, so that a grant drains until its holder
        // can no longer act (a release mark would free the permits at once).
        for name in &theirs {
            match timed(client_args.request_timeout, "deleting the request", api.delete(name, &Default::default()))
                .await
            {
                Ok(_) => println!("lockrequest {name} deleted (a grant drains until its holder can no longer act)"),
                Err(crate::client::ClientError::Api { source: kube::Error::Api(e), .. }) if e.code == 404 => {
                    println!("lockrequest {name} not found (already released)")
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    for name in &names {
        if locks.release_request(name, None).await? {
            println!("lockrequest {name} released");
        } else {
            println!("lockrequest {name} not found (already released)");
        }
    }
    if let Some(d) = dir {
        d.clear().map_err(|source| CliError::File { path: d.path().to_path_buf(), source })?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `kubelock status` flags.
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// The Lock.
    #[arg(value_name = "LOCK")]
    pub lock: String,
    /// Output format (json/yaml: the Lock object).
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// The Lock `name` of the selected namespace (an error if missing) and the requests' API there.
async fn read_lock(client_args: &ClientArgs, name: &str) -> Result<(Lock, Api<LockRequest>), CliError> {
    let (kube, namespace) = client_args.client().await?;
    let locks: Api<Lock> = Api::namespaced(kube.clone(), &namespace);
    let requests: Api<LockRequest> = Api::namespaced(kube, &namespace);
    let lock = timed(client_args.request_timeout, "reading the lock", locks.get_opt(name))
        .await?
        .ok_or_else(|| CliError::NotFound { what: "lock", name: name.to_string(), namespace: namespace.clone() })?;
    Ok((lock, requests))
}

/// `kubelock status LOCK`: holders, tokens, queue.
pub async fn status(args: StatusArgs, client_args: &ClientArgs) -> Result<ExitCode, CliError> {
    let t = client_args.request_timeout;
    let (lock, requests) = read_lock(client_args, &args.lock).await?;
    if args.output != Output::Table {
        print_output(&lock, args.output, String::new)?;
        return Ok(ExitCode::SUCCESS);
    }
    let list = timed(
        t,
        "listing lock requests",
        requests.list(&ListParams::default().labels(&format!("{LOCK_LABEL}={}", args.lock))),
    )
    .await?;
    let mut reqs: Vec<LockRequest> = list.items.into_iter().filter(|r| r.spec.lock_name == args.lock).collect();
    reqs.sort_by_key(|r| (r.creation_timestamp(), r.name_any()));
    print!("{}", render_status(&lock, &reqs, jiff::Timestamp::now()));
    Ok(ExitCode::SUCCESS)
}

/// `kubelock list` flags.
#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// Locks of every namespace.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// `kubelock list [-A]`.
pub async fn list(args: ListArgs, client_args: &ClientArgs) -> Result<ExitCode, CliError> {
    let (kube, namespace) = client_args.client().await?;
    let api: Api<Lock> = if args.all_namespaces { Api::all(kube) } else { Api::namespaced(kube, &namespace) };
    let mut list = timed(client_args.request_timeout, "listing locks", api.list(&ListParams::default())).await?;
    list.items.sort_by_key(|l| (l.namespace(), l.name_any()));
    if args.output != Output::Table {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct LockList<'a> {
            api_version: &'static str,
            kind: &'static str,
            items: &'a [Lock],
        }
        print_output(&LockList { api_version: "v1", kind: "List", items: &list.items }, args.output, String::new)?;
        return Ok(ExitCode::SUCCESS);
    }
    if list.items.is_empty() {
        if args.all_namespaces {
            eprintln!("No locks found.");
        } else {
            eprintln!("No locks found in namespace {namespace}.");
        }
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", render_list(&list.items, args.all_namespaces, jiff::Timestamp::now()));
    Ok(ExitCode::SUCCESS)
}

/// `kubelock break` flags.
#[derive(clap::Args, Debug)]
pub struct BreakArgs {
    /// The Lock whose holder to break.
    #[arg(value_name = "LOCK")]
    pub lock: String,
    /// The holder's LockRequest (required when the lock has several holders).
    #[arg(long, value_name = "REQUEST")]
    pub request: Option<String>,
    /// Why (recorded in the Event and the request's status).
    #[arg(long, value_name = "TEXT")]
    pub reason: String,
    /// Who breaks it (default: the kubeconfig user, else the context name).
    #[arg(long, value_name = "WHO")]
    pub by: Option<String>,
}

/// Who is breaking: the kubeconfig user of the selected context, else the context name.
fn whoami(client_args: &ClientArgs) -> String {
    let kc = match &client_args.kubeconfig {
        Some(p) if !p.as_os_str().is_empty() => Kubeconfig::read_from(p).ok(),
        _ => Kubeconfig::read().ok(),
    };
    let from_kc = kc.and_then(|kc| {
        let ctx_name = client_args.context.clone().or(kc.current_context.clone())?;
        let ctx = kc.contexts.iter().find(|c| c.name == ctx_name)?;
        let user = ctx.context.as_ref().and_then(|c| c.user.clone()).filter(|u| !u.is_empty());
        Some(user.unwrap_or(ctx_name))
    });
    from_kc
        .or_else(|| PodIdentity::from_env().map(|p| format!("pod/{}", p.name)))
        .or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "unknown".into())
}

/// `kubelock break LOCK --reason TEXT`: annotates the holder's request; the controller ends
/// the grant (draining until the holder cannot act, then lockDelay) and records an Event
/// with who and why (with the admission webhook: the authenticated user, not `--by`).
pub async fn break_lock(args: BreakArgs, client_args: &ClientArgs) -> Result<ExitCode, CliError> {
    if args.reason.trim().is_empty() {
        return Ok(usage("break: --reason must not be empty (it is recorded with the break)"));
    }
    let t = client_args.request_timeout;
    let (lock, requests) = read_lock(client_args, &args.lock).await?;
    let holders = lock.status.clone().unwrap_or_default().holders;
    let holder = match &args.request {
        Some(r) => match holders.iter().find(|h| h.request == *r) {
            Some(h) => h.clone(),
            None => {
                return Err(CliError::Usage(format!(
                    "request {r} does not hold lock {} (holders: {})",
                    args.lock,
                    names_of(&holders)
                )));
            }
        },
        None => match holders.as_slice() {
            [] => return Err(CliError::Usage(format!("lock {} has no holder: nothing to break", args.lock))),
            [h] => h.clone(),
            many => {
                return Err(CliError::Usage(format!(
                    "lock {} has {} holders ({}): choose one with --request",
                    args.lock,
                    many.len(),
                    names_of(many)
                )));
            }
        },
    };
    let who = args.by.clone().unwrap_or_else(|| whoami(client_args));
    let patch = serde_json::json!({
        "metadata": {
            "uid": holder.request_uid,
            "annotations": { BREAK_ANNOTATION: args.reason, BROKEN_BY_ANNOTATION: who },
        }
    });
    let params = PatchParams { field_manager: Some(CLIENT_MANAGER.into()), ..Default::default() };
    match timed(t, "annotating the holder's request", requests.patch(&holder.request, &params, &Patch::Merge(&patch)))
        .await
    {
        Ok(_) => {}
        Err(ClientError::Api { source: kube::Error::Api(s), .. }) if s.code == 404 || s.code == 409 => {
            return Err(CliError::Usage(format!(
                "request {} no longer exists (released meanwhile?): nothing to break",
                holder.request
            )));
        }
        Err(e) => return Err(e.into()),
    }
    println!(
        "lock {}: break of request {} (holder {}, token {}) requested by {who}: {:?}; the controller expires it",
        args.lock, holder.request, holder.holder, holder.token, args.reason
    );
    Ok(ExitCode::SUCCESS)
}

fn names_of(holders: &[crate::api::Holder]) -> String {
    if holders.is_empty() {
        return "none".into();
    }
    holders.iter().map(|h| format!("{} ({})", h.request, h.holder)).collect::<Vec<_>>().join(", ")
}
