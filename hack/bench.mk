# Benchmarks; included by the Makefile. Owned with examples/bench/.
#
#   make bench                       full run, under 10 minutes on 2 cores
#   make bench BENCH_QUICK=1         small sizes, about 2 minutes
#   make bench BENCH_ONLY=1,2,3      some items only (numbers as in the table)
#
# Figures go to stdout and target/bench/report.json; controller logs to target/bench/.

.PHONY: bench

bench: deps ## Benchmark against the floors and peers (etcd on disk): table + target/bench/report.json.
	$(CARGO) build --release --bin kubelock --example bench
	./target/release/examples/bench
