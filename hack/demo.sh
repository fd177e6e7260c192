#!/usr/bin/env bash
# kubelock working end to end on a local control plane: `kubelock dev` (etcd +
# kube-apiserver + the controller), then `kubelock run` clients contending for a mutex and
# a 3-permit semaphore, a holder frozen past its lease losing to the next waiter (and its
# late write fenced off), and the CLI showing the result.
#
#   hack/demo.sh                 uses target/debug/kubelock (built if missing)
#   KUBELOCK=/path/to/kubelock hack/demo.sh
#
# Needs what `kubelock dev` needs (src/devenv/control-plane.sh install). Everything it starts is
# stopped when it exits.
set -euo pipefail

cd "$(dirname "$0")/.."
KUBELOCK=${KUBELOCK:-target/debug/kubelock}
if [ ! -x "$KUBELOCK" ]; then
  echo "demo: building kubelock" >&2
  cargo build --quiet
fi
KUBELOCK=$(cd "$(dirname "$KUBELOCK")" && pwd)/$(basename "$KUBELOCK")
# The shop's buyers (examples/inventory.rs), built beside kubelock.
INVENTORY=${INVENTORY:-$(dirname "$KUBELOCK")/examples/inventory}
if [ ! -x "$INVENTORY" ]; then
  echo "demo: building examples/inventory.rs" >&2
  cargo build --quiet --example inventory
  INVENTORY=target/debug/examples/inventory
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/kubelock-demo.XXXXXX")
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  [ -n "${DEV_PID:-}" ] && kill -INT "$DEV_PID" 2>/dev/null && wait "$DEV_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
T0=$(date +%s%N)
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
# Children print "+SECONDS.MS name: message".
export T0
stamp='ms=$(( ($(date +%s%N) - T0) / 1000000 )); printf "+%3d.%03ds " $((ms / 1000)) $((ms % 1000))'

say "starting a local control plane and the controller (kubelock dev, ~10 s)"
ADMIN=${DEMO_ADMIN_ADDR:-127.0.0.1:9090}
# shellcheck disable=SC2086
"$KUBELOCK" dev --admin-addr "$ADMIN" --log warn ${DEV_ARGS:-} >"$WORK/dev.out" 2>"$WORK/dev.err" &
DEV_PID=$!
for _ in $(seq 1 600); do
  grep -q '^export KUBECONFIG=' "$WORK/dev.out" 2>/dev/null && break
  kill -0 "$DEV_PID" 2>/dev/null || { cat "$WORK/dev.err" >&2; exit 1; }
  sleep 0.2
done
eval "$(grep '^export KUBECONFIG=' "$WORK/dev.out")"
echo "KUBECONFIG=$KUBECONFIG"

# Locks are ordinary objects; create them with the API server's REST API (no kubectl needed).
create_lock() { # NAME PERMITS LEASE DELAY
  local server token ca
  server=$(sed -n 's/^ *server: //p' "$KUBECONFIG" | head -1)
  token=$(sed -n 's/^ *user: {token: \(.*\)}$/\1/p' "$KUBECONFIG" | head -1)
  ca=$(sed -n 's/^ *certificate-authority: //p' "$KUBECONFIG" | head -1)
  curl -fsS --cacert "$ca" -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
    "$server/apis/kubelock.dev/v1alpha1/namespaces/default/locks" \
    -d "{\"apiVersion\":\"kubelock.dev/v1alpha1\",\"kind\":\"Lock\",\"metadata\":{\"name\":\"$1\"},\"spec\":{\"permits\":$2,\"leaseDuration\":\"$3\",\"lockDelay\":\"$4\"}}" >/dev/null
  echo "lock $1: permits $2, leaseDuration $3, lockDelay $4"
}
create_lock demo-mutex 1 10s 0s
create_lock demo-pool 3 10s 0s
create_lock demo-frozen 1 3s 1s
T0=$(date +%s%N)

# A client: `kubelock run` with a child that reports its token, works, and reports again.
client() { # NAME LOCK SECONDS
  "$KUBELOCK" --log warn run --lock "$2" -- sh -c "
    $stamp; echo \"$1: granted, token \$KUBELOCK_TOKEN, working\"
    sleep $3
    $stamp; echo \"$1: done with token \$KUBELOCK_TOKEN, releasing\"" &
  PIDS+=($!)
}

say "mutex: four clients, one at a time, tokens increase with every handover"
for c in alice bob carol dave; do client "$c" demo-mutex 1; done
sleep 1.5
echo "---- kubelock status demo-mutex (meanwhile) ----"
"$KUBELOCK" status demo-mutex | sed 's/^/    /'
echo "----"
wait "${PIDS[@]}"; PIDS=()

say "semaphore (3 permits): six clients, never more than three at once"
for c in w1 w2 w3 w4 w5 w6; do client "$c" demo-pool 1.5; done
wait "${PIDS[@]}"; PIDS=()

say "a holder frozen past its lease (SIGSTOP), the waiter takes over, the late write is fenced off"
LEDGER=$WORK/ledger
cat >"$WORK/fenced-write.sh" <<'EOF'
#!/bin/sh
# fenced-write.sh LEDGER TOKEN WHO: the resource refuses tokens lower than the highest seen.
exec 9>>"$1.lock"; flock 9
max=$(cat "$1.max" 2>/dev/null || echo 0)
if [ "$2" -ge "$max" ]; then echo "$2" >"$1.max"; echo "    ledger: accepted write of $3 with token $2" | tee -a "$1"
else echo "    ledger: REFUSED write of $3 with token $2 (highest seen $max)" | tee -a "$1"; fi
EOF
FW="sh $WORK/fenced-write.sh $LEDGER"
# Its own session and process group (setsid), shared with its command (--process-group
# same), so that one SIGSTOP freezes both, as a GC pause or a stalled node would.
setsid "$KUBELOCK" --log warn run --lock demo-frozen --process-group same -- sh -c "
  trap '$stamp; echo \"frozen: thawed and told to stop; flushing one last write\"; $FW \$KUBELOCK_TOKEN frozen; exit 0' TERM
  $stamp; echo \"frozen: granted, token \$KUBELOCK_TOKEN\"; $FW \$KUBELOCK_TOKEN frozen; touch $WORK/frozen.ready
  while :; do sleep 0.05; done" 2>"$WORK/frozen.err" &
FROZEN=$!
PIDS+=($FROZEN)
until [ -f "$WORK/frozen.ready" ]; do sleep 0.05; done
"$KUBELOCK" --log warn run --lock demo-frozen -- sh -c "
  $stamp; echo \"waiter: granted, token \$KUBELOCK_TOKEN\"; $FW \$KUBELOCK_TOKEN waiter; touch $WORK/waiter.ready; sleep 1" &
WAITER=$!
PIDS+=($WAITER)
sleep 0.5
eval "$stamp"; echo "SIGSTOP to the holder (wrapper and command): it stops renewing"
kill -STOP -- "-$FROZEN"
until [ -f "$WORK/waiter.ready" ]; do sleep 0.05; done
eval "$stamp"; echo "SIGCONT to the frozen holder"
kill -CONT -- "-$FROZEN"
set +e; wait "$FROZEN"; code=$?; set -e
sed 's/^/    /' "$WORK/frozen.err" | grep 'kubelock:' || true
echo "    frozen holder's kubelock run exited $code (75 = lock lost)"
wait "$WAITER" || true
PIDS=()

say "the shop: its stock in a ConfigMap fenced by a Lock; a buyer frozen past its lease, thawed after others sold"
# shop LOCK [--no-fence]: 10 items; the frozen buyer reads first, then alice and bob sell.
shop() {
  local lock=$1 rec=$WORK/$1.sales pid
  shift
  create_lock "$lock" 1 3s 0s
  "$INVENTORY" --lock "$lock" open --stock 10 "$@" | sed 's/^/    /'
  "$INVENTORY" --lock "$lock" buy frozen --freeze-after-read --record "$rec" >"$WORK/$lock.frozen" &
  pid=$!
  # Stopped (state T in /proc/PID/stat) once it has read the stock.
  until [ "$(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null)" = T ]; do sleep 0.05; done
  sed 's/^/    /' "$WORK/$lock.frozen"
  "$INVENTORY" --lock "$lock" buy alice --count 2 --record "$rec" | sed 's/^/    /'
  "$INVENTORY" --lock "$lock" buy bob --count 2 --record "$rec" | sed 's/^/    /'
  kill -CONT "$pid"
  wait "$pid" || true
  tail -n +2 "$WORK/$lock.frozen" | sed 's/^/    /'
  "$INVENTORY" --lock "$lock" audit --opened 10 --record "$rec" | sed 's/^/    audit: /' || true
}
echo "-- fenced (kubelock.dev/fenced-by: shop): the API server refuses the stale write"
shop shop
echo "-- the same without the fence: the stale write overwrites the sales it never saw"
shop shop-unfenced --no-fence

say "kubelock list"
"$KUBELOCK" list

if [ -n "${DEMO_EXIT:-}" ]; then exit 0; fi
say "the control plane and the controller keep running: try it yourself"
echo "    export KUBECONFIG=$KUBECONFIG"
echo "    kubectl get locks,lockrequests            # or: $KUBELOCK list"
echo "    curl -s http://$ADMIN/metrics | grep ^kubelock_   # the controller's metrics"
echo "    $KUBELOCK run --lock demo-mutex -- sh -c 'echo token \$KUBELOCK_TOKEN; sleep 5'"
echo "Ctrl-C stops everything this demo started."
trap 'exit 0' INT TERM
wait "$DEV_PID"
