#!/usr/bin/env bash
# Runs the whole test suite against the real local stack: brings the stack up (installing
# what is missing), points the tests at it and runs `cargo test` for the workspace.
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh -p dbps-testkit`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

"$root/scripts/stack.sh" up
eval "$("$root/scripts/stack.sh" env)"

if [ "$#" -eq 0 ]; then
    set -- --workspace
fi
exec cargo test "$@"
