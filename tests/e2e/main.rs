//! End-to-end tests against a real Kubernetes API server: one test binary, so that one
//! control plane (started on first use, see `support`) serves every test of a run.
//!
//! Modules: `smoke` (the harness itself), `chart` (the Helm chart, RBAC and examples), `lock`
//! (the controller), `client` (run, sidecar, CLI, plugin, library), `faults` (fault runs judged by the
//! history checker, bad input), `image` (the container image), `node` (pods on a local node,
//! the images of `make image`), `node_chart` (the Helm chart and killed holder pods on the local
//! node), `node_examples` (every `examples/*.yaml` running on the local node), `node_teardown` (nothing
//! of a node outlives it; after the other node modules, as they stop the shared node). Add one module
//! per area.

mod support;

mod chart;
mod client;
mod faults;
mod image;
mod lock;
mod node;
mod node_chart;
mod node_examples;
mod node_teardown;
mod smoke;
mod webhook;
