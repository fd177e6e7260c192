# Fault injection; included by the Makefile. Owned with tests/e2e/faults.rs.
#
#   make chaos                                  10 seeds x the four fault runs, 120 s workload each
#   make chaos CHAOS_SEEDS=50 CHAOS_SECONDS=60  more seeds, shorter runs
#   make chaos CHAOS_SEED=123456 CHAOS_SEEDS=1  replay one seed
#
# `make test` runs each fault run once (random seed, 40 s); this runs many and sums them up.

CHAOS_SEEDS ?= 10
CHAOS_SECONDS ?= 120

.PHONY: chaos

chaos: deps ## Fault runs with many seeds, judged by the history checker; prints a summary.
	CHAOS_SEEDS=$(CHAOS_SEEDS) CHAOS_SECONDS=$(CHAOS_SECONDS) CARGO=$(CARGO) hack/chaos.sh
