#!/usr/bin/env bash
# Long fault-injection runs: the checker-judged fault runs of tests/e2e/faults.rs,
# once per seed, then a summary. `make chaos` calls this; see hack/chaos.mk for the knobs.
#
#   CHAOS_SEEDS    how many seeds (runs of each fault test)            default 10
#   CHAOS_SEED     the first seed; the others follow it                default: random
#   CHAOS_SECONDS  workload time of each run (KUBELOCK_FAULT_SECONDS)  default 120
#   CHAOS_TESTS    which tests (cargo test filters)                    default: the four fault runs
#   CHAOS_OUT      where the report and the logs of failed runs go     default target/chaos
set -euo pipefail

seeds=${CHAOS_SEEDS:-10}
first=${CHAOS_SEED:-$(( (RANDOM << 15 | RANDOM) % 1000000000 ))}
seconds=${CHAOS_SECONDS:-120}
tests=${CHAOS_TESTS:-faults::controllers_crash_and_split_brain faults::control_plane_outages_frozen_and_skewed_holders faults::grants_ended_by_others_while_holders_act faults::a_burst_of_requests_is_granted_in_order}
out=${CHAOS_OUT:-target/chaos}
cargo=${CARGO:-cargo}

mkdir -p "$out"
report="$out/report-$(date -u +%Y%m%dT%H%M%SZ).txt"
: > "$report"
echo "chaos: $seeds seed(s) from $first, ${seconds}s of workload per run; report: $report"
$cargo test --test e2e --no-run --quiet

failed=()
started=$(date +%s)
for ((i = 0; i < seeds; i++)); do
  seed=$((first + i))
  echo "== seed $seed ($((i + 1))/$seeds)"
  # shellcheck disable=SC2086 # the test filters are words
  if ! KUBELOCK_FAULT_SEED=$seed KUBELOCK_FAULT_SECONDS=$seconds KUBELOCK_FAULT_REPORT="$PWD/$report" \
    KUBELOCK_FAULT_LOGS="$PWD/$out/logs" \
    $cargo test --quiet --test e2e -- $tests --test-threads 3 2>&1 | tee "$out/seed-$seed.log" | grep -E '^(fault run|burst|test result|failures|thread)'; then
    failed+=("$seed")
  elif grep -q "FAILED\|panicked" "$out/seed-$seed.log"; then
    failed+=("$seed")
  fi
done

echo
echo "chaos summary ($(( $(date +%s) - started ))s; one line per run in $report)"
awk '
  { for (i = 1; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] } }
  { runs++; violations += f["violations"]; grants += f["grants"]; expiries += f["expiries"]; drained += f["drained"]
    revisions += f["revisions"]; pairs += f["fifo_pairs"]; steps += f["steps"]
    if (f["longest_stall_ms"] > stall) stall = f["longest_stall_ms"]
    n = split(f["faults"], fs, ",")
    for (j = 1; j <= n; j++) { split(fs[j], kn, ":"); if (kn[1] != "") { faults[kn[1]] += kn[2]; total += kn[2] } } }
  END {
    printf "  runs judged:        %d\n", runs
    printf "  faults injected:    %d", total
    sep = " ("; for (k in faults) { printf "%s%s %d", sep, k, faults[k]; sep = ", " } ; if (total) printf ")"; printf "\n"
    printf "  grants checked:     %d (%d expiries, %d drained, %d FIFO pairs, %d Lock/LockRequest revisions)\n", grants, expiries, drained, pairs, revisions
    printf "  holder steps:       %d (each checked inside its grant)\n", steps
    printf "  longest stall:      %d ms (outside excused time)\n", stall
    printf "  violations:         %d\n", violations
  }' "$report"
if ((${#failed[@]})); then
  echo "  FAILED seeds:       ${failed[*]} (logs: $out/seed-<seed>.log, $out/logs/; replay: KUBELOCK_FAULT_SEED=<seed> make test TEST_ARGS=faults::)"
  exit 1
fi
