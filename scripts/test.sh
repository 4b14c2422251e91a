#!/usr/bin/env bash
# Runs the whole test suite against the real local stack: brings the stack up (installing
# what is missing), points the tests at it and runs `cargo test` for the workspace.
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh -p dbps-testkit`).
#
# Every test binary runs even when an earlier one failed (`--no-fail-fast`), and the last
# line is the suite's totals over all binaries and doc-tests: `N passed, N failed`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

"$root/scripts/stack.sh" up
eval "$("$root/scripts/stack.sh" env)"

if [ "$#" -eq 0 ]; then
    set -- --workspace
fi
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
cargo test --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
"$root/scripts/test-totals.sh" "$log"
exit "$status"
