#!/usr/bin/env bash
# Runs the test suite N times in a row against the local stack and counts failures per
# test, to find tests that fail by chance.
#
#   scripts/repeat-tests.sh N [cargo test args]     e.g. scripts/repeat-tests.sh 10
#                                                         scripts/repeat-tests.sh 20 -p dbps-outbox --test pg_outbox
#
# Builds once, then runs. Prints each run's wall time and totals as it goes, and at the
# end every test that failed at least once, with how often; each run's full output stays
# in target/repeat-tests/run-K.log. Exits 1 if any run failed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

runs="${1:-}"
[[ "$runs" =~ ^[1-9][0-9]*$ ]] || { echo "usage: scripts/repeat-tests.sh N [cargo test args]" >&2; exit 2; }
shift
[ "$#" -gt 0 ] || set -- --workspace

"$root/scripts/stack.sh" up >/dev/null
eval "$("$root/scripts/stack.sh" env)"
out="$root/target/repeat-tests"
rm -rf "$out"
mkdir -p "$out"

cargo test --no-run "$@" >"$out/build.log" 2>&1 || { tail -n 30 "$out/build.log"; exit 1; }

failed_runs=0
for run in $(seq 1 "$runs"); do
    log="$out/run-$run.log"
    started=$(date +%s%N)
    status=0
    cargo test --no-fail-fast "$@" >"$log" 2>&1 || status=$?
    took_ds=$((($(date +%s%N) - started) / 100000000))
    totals="$("$root/scripts/test-totals.sh" "$log")"
    [ "$status" -eq 0 ] || failed_runs=$((failed_runs + 1))
    printf 'run %3d  %5d.%d s  %s%s\n' "$run" "$((took_ds / 10))" "$((took_ds % 10))" "$totals" "$([ "$status" -eq 0 ] || echo "  (exit $status)")"
    # "<test binary> <test name>" for every failed test of this run.
    awk '/^     Running / { binary = $2 }
         /^   Doc-tests / { binary = "doc:" $2 }
         / \.\.\. FAILED$/ { sub(/^test /, ""); sub(/ \.\.\. FAILED$/, ""); print binary " " $0 }' "$log" >>"$out/failures"
done

echo
if [ -s "$out/failures" ]; then
    echo "failures per test over $runs runs:"
    sort "$out/failures" | uniq -c | sort -rn
else
    echo "no test failed in $runs runs"
fi
[ "$failed_runs" -eq 0 ]
