//! kubelock: a Kubernetes-native distributed lock service.
//!
//! - [`api`]: the `Lock` and `LockRequest` types and their CRDs.
//! - [`planner`]: the pure grant decision.
//! - [`controller`]: fetch, plan, compare-and-swap, mirror.
//! - [`client`]: acquire, renew, release, local deadline; used by every tool below.
//! - [`cli`], [`sidecar`]: the command-line tools and the pod sidecar; [`pod`] and [`tools`]
//!   what they share (the pod's identity and files, exit codes).
//! - [`telemetry`]: logs, metrics, admin server.
//! - [`webhook`]: the admission webhooks (ownership of requests, immutable grant terms,
//!   bounds, the fence of objects guarded by a Lock).
//! - `devenv` (cargo feature `dev`, on by default, off in the image): the local control plane
//!   used by `kubelock dev`, the tests and the benchmarks.
#![forbid(unsafe_code)]

pub mod api;
pub mod cli;
pub mod client;
pub mod connect;
pub mod controller;
#[cfg(feature = "dev")]
pub mod devenv;
pub mod planner;
pub mod pod;
pub mod sidecar;
pub mod telemetry;
pub mod tools;
pub mod webhook;
