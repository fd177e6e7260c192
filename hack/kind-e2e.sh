#!/usr/bin/env bash
# The end-to-end path on a laptop with Docker: a kind cluster, the kubelock image built and
# loaded into it, the chart installed the way users install it, a lock granted by the
# in-cluster controller, then the e2e suite against that cluster (`make e2e-kind`).
#
# Needs: docker (a running engine), kind, python3 with helm-sdkpy (`make helm-sdk`), cargo.
# kubectl is not needed (the one inside the kind node is used for two small steps).
#
# Environment:
#   KIND_CLUSTER   cluster name (default kubelock-e2e); reused if it exists
#   KIND_IMAGE     kind node image (default: kind's own default)
#   IMAGE          image to build and load (default kubelock:e2e)
#   KEEP_CLUSTER=1 keep the cluster afterwards (default: delete it if this script created it)
#   E2E_ARGS       arguments for the test binary, e.g. 'chart::' or '--test-threads=2'
set -euo pipefail

cd "$(dirname "$0")/.."
CLUSTER=${KIND_CLUSTER:-kubelock-e2e}
IMAGE=${IMAGE:-kubelock:e2e}
RELEASE_NS=kubelock-system
PYTHON=${PYTHON:-python3}

die() { echo "kind-e2e: error: $*" >&2; exit 1; }
log() { echo "kind-e2e: $*" >&2; }

for tool in docker kind cargo "$PYTHON"; do
  command -v "$tool" >/dev/null || die "$tool not found (needs docker, kind, cargo, python3)"
done
docker info >/dev/null 2>&1 || die "no Docker engine answers (docker info failed)"
"$PYTHON" -c 'import helm_sdkpy' 2>/dev/null || die "helm-sdkpy missing: run 'make helm-sdk'"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/kubelock-kind.XXXXXX")
KUBECONFIG_FILE="$WORK/kubeconfig"
CREATED=0
cleanup() {
  local rc=$?
  if [ "$CREATED" = 1 ] && [ "${KEEP_CLUSTER:-0}" != 1 ]; then
    log "deleting cluster $CLUSTER (KEEP_CLUSTER=1 keeps it)"
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  elif [ "$CREATED" = 1 ]; then
    kind export kubeconfig --name "$CLUSTER" --kubeconfig "$WORK/kubeconfig.keep" >/dev/null 2>&1 || true
    log "cluster kept: export KUBECONFIG=$WORK/kubeconfig.keep"
    return $rc
  fi
  rm -rf "$WORK"
  return $rc
}
trap cleanup EXIT

# In-node kubectl (the kind node image ships it), fed on stdin.
node_kubectl() {
  docker exec -i "$CLUSTER-control-plane" kubectl --kubeconfig /etc/kubernetes/admin.conf "$@"
}

if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  log "reusing cluster $CLUSTER"
else
  log "creating cluster $CLUSTER"
  CREATED=1
  kind create cluster --name "$CLUSTER" ${KIND_IMAGE:+--image "$KIND_IMAGE"} --wait 180s
fi
kind export kubeconfig --name "$CLUSTER" --kubeconfig "$KUBECONFIG_FILE" >/dev/null

log "building $IMAGE"
docker build -t "$IMAGE" .
log "loading $IMAGE into $CLUSTER"
kind load docker-image "$IMAGE" --name "$CLUSTER"

# The chart as README.md installs it, with the freshly built image. The controller watches
# only its own namespace, so that the e2e suite's own controllers alone serve the test
# namespaces; --wait returns once both replicas are Ready, i.e. their watches synced,
# which needs the chart's RBAC to work on a real cluster.
log "installing the chart (release kubelock in $RELEASE_NS)"
"$PYTHON" hack/helm.py uninstall kubelock -n "$RELEASE_NS" --kubeconfig "$KUBECONFIG_FILE" --ignore-not-found >/dev/null
"$PYTHON" hack/helm.py install kubelock charts/kubelock -n "$RELEASE_NS" --create-namespace \
  --kubeconfig "$KUBECONFIG_FILE" --take-ownership --wait --timeout 300 \
  --set "image.repository=${IMAGE%:*},image.tag=${IMAGE##*:},image.pullPolicy=Never" \
  --set "watchNamespace=$RELEASE_NS"

# One lock granted by the in-cluster controller: create a Lock, then take and release it
# with `kubelock run` from this machine.
log "smoke test: a lock granted by the in-cluster controller"
node_kubectl apply -f - <<EOF
apiVersion: kubelock.dev/v1alpha1
kind: Lock
metadata: {name: kind-smoke, namespace: $RELEASE_NS}
spec: {permits: 1, leaseDuration: 15s}
EOF
cargo build --quiet --bin kubelock
./target/debug/kubelock --kubeconfig "$KUBECONFIG_FILE" -n "$RELEASE_NS" \
  run --lock kind-smoke --wait-timeout 60s -- true ||
  { node_kubectl -n "$RELEASE_NS" get pods,locks,lockrequests -o wide >&2 || true
    node_kubectl -n "$RELEASE_NS" logs -l app.kubernetes.io/instance=kubelock --tail 50 >&2 || true
    die "the in-cluster controller did not grant kind-smoke"; }
log "smoke test passed"

# The same end-to-end suite as on the local control plane, against the kind cluster. The node
# modules start the machine's own local node (root, containerd of their own, hostPath files
# read by the test): they are skipped here; the chart and examples they run on that node were
# installed above the way users install them.
log "running the e2e suite against $CLUSTER"
# shellcheck disable=SC2086
KUBELOCK_TEST_KUBECONFIG="$KUBECONFIG_FILE" cargo test --test e2e -- \
  --skip node:: --skip node_chart:: --skip node_examples:: --skip node_teardown:: ${E2E_ARGS:-}
