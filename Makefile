# kubelock: see README.md. Everything cached lives outside the checkout
# (~/.cache/kubelock for kube-apiserver, ~/.cargo for Rust and crates, target/ for builds).
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
# rustup installs cargo here; make it visible even if the shell profile was not re-read.
export PATH := $(HOME)/.cargo/bin:$(PATH)

CARGO ?= cargo
# Extra flags for `kubelock dev` (make demo DEV_ARGS=--etcd-on-disk) and for the test binaries
# (make test TEST_ARGS='smoke::').
DEV_ARGS ?=
TEST_ARGS ?=

.PHONY: help deps demo test crds lint fmt

help: ## List the targets.
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-6s %s\n", $$1, $$2}'

deps: ## Install what is missing: C toolchain, Rust, etcd, kube-apiserver (first time ~7 min).
	@hack/deps.sh

demo: deps ## Live demo on a local control plane: contention, handovers, fencing; then runs until Ctrl-C.
	$(CARGO) build --release --bin kubelock --example inventory
	KUBELOCK=target/release/kubelock DEV_ARGS="$(DEV_ARGS)" hack/demo.sh

test: deps ## Run every test, including the end-to-end tests against a real kube-apiserver.
	$(CARGO) test --all-targets -- $(TEST_ARGS)

crds: ## Regenerate crds/ from the API types.
	$(CARGO) run --quiet --bin kubelock -- crd > crds/kubelock.dev.yaml.tmp
	mv crds/kubelock.dev.yaml.tmp crds/kubelock.dev.yaml

lint: ## clippy (warnings are errors) and the rustfmt check; CI runs it.
	@command -v rustup >/dev/null && rustup component add clippy rustfmt 2>/dev/null || true
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt: ## Format the code.
	$(CARGO) fmt

# --- Helm chart, container image and kind: targets in hack/chart.mk (owned with charts/kubelock).
include hack/chart.mk

# --- Benchmarks: `make bench`, in hack/bench.mk (owned with examples/bench/).
include hack/bench.mk

# --- Fault injection: `make chaos`, in hack/chaos.mk (owned with tests/e2e/faults.rs).
include hack/chaos.mk
