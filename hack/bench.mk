# Benchmarks; included by the Makefile. Owned with examples/bench/.
#
#   make bench                       full run, about 20 minutes on 2 cores (item 10 creates
#                                    100,000 requests; BENCH_QUEUE=10000 for a shorter one)
#   make bench BENCH_QUICK=1         small sizes, about 2 minutes
#   make bench BENCH_ONLY=1,2,3      some items only (numbers as in the table)
#
# Figures go to stdout and target/bench/report.json; controller logs to target/bench/.

.PHONY: bench bench-peers

bench: deps bench-peers ## Benchmark against the floors and peers (etcd on disk): table + target/bench/report.json.
	$(CARGO) build --release --bin kubelock --example bench
	./target/release/examples/bench

# The ZooKeeper peer (item 9): Debian's zookeeper (a Java server, run standalone on loopback by
# the bench) and the kazoo client for its lock recipe. Installed for the bench only.
bench-peers: ## Install what the bench's peers need if missing: Debian zookeeper, the kazoo wheel.
	@if [ ! -e /usr/share/java/zookeeper.jar ]; then \
	  echo "installing zookeeper (apt-get) for the bench's ZooKeeper peer" >&2; \
	  if [ "$$(id -u)" = 0 ]; then sudo=""; else sudo=sudo; fi; \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q zookeeper >&2 || \
	    { $$sudo apt-get update -q >&2 && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q zookeeper >&2; }; \
	fi
	@if ! $(PYTHON) -c 'import kazoo' 2>/dev/null; then \
	  echo "installing kazoo for $(PYTHON) (pip)" >&2; \
	  $(PYTHON) -m pip install --quiet --disable-pip-version-check kazoo || \
	    $(PYTHON) -m pip install --quiet --disable-pip-version-check --break-system-packages kazoo; \
	fi
