#!/usr/bin/env bash
# Runs the small examples, one per pattern (examples/outbox-pg, inbox-consumer, migrate,
# outbox-mongo, redis-cache, replica), against the local stack; each exits 0 only if its pattern did
# what it says. Running them again is safe: their databases, topics and keys are reused.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

"$root/scripts/stack.sh" up >/dev/null
eval "$("$root/scripts/stack.sh" env)"

examples=(outbox-pg inbox-consumer migrate outbox-mongo redis-cache replica)
cargo build --quiet $(printf -- '-p example-%s ' "${examples[@]}")
for example in "${examples[@]}"; do
    printf '\n==> examples/%s\n' "$example"
    "$root/target/debug/example-$example"
done
