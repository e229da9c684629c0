#!/usr/bin/env bash
# Run CI's whole suite several times, each from a fresh clone of HEAD, to find tests that
# fail by chance: scripts/flake_hunt.sh [RUNS] [--busy]
#
# --busy keeps every core busy with a spinning process beside the suite (one per core, at
# the same priority), the way a build or a benchmark beside it would. Each run's output is
# in $FLAKE_DIR (default: a new temporary directory), one log per run, and the last line of
# each run's pytest summary is printed as it ends. Exits 1 when any run failed.
set -uo pipefail
runs=${1:-5}
busy=${2:-}
repo=$(git rev-parse --show-toplevel)
out=${FLAKE_DIR:-$(mktemp -d -t mmd-flakes.XXXXXX)}
mkdir -p "$out"
burners=()
stop_burners() { [ "${#burners[@]}" -eq 0 ] || kill "${burners[@]}" 2>/dev/null; }
trap stop_burners EXIT
if [ "$busy" = "--busy" ]; then
  for _ in $(seq 1 "$(nproc)"); do
    python3 -c 'while True: pass' &
    burners+=($!)
  done
fi
failed=0
for n in $(seq 1 "$runs"); do
  clone="$out/clone-$n"
  rm -rf "$clone"
  git clone --quiet "$repo" "$clone"
  start=$(date +%s)
  (cd "$clone" && CI=true bash .ci/run </dev/null >"$out/run-$n.log" 2>&1)
  status=$?
  summary=$(grep -E '(passed|failed|error)' "$out/run-$n.log" | tail -n 1)
  echo "run $n: exit $status in $(($(date +%s) - start)) s: ${summary:-no pytest summary} (log: $out/run-$n.log)"
  [ "$status" -eq 0 ] || failed=1
  rm -rf "$clone"
done
exit "$failed"
