#!/usr/bin/env bash
# The example system's demo. Brings up the local stack (PostgreSQL, Kafka, a
# MongoDB-protocol server and Redis) and shows where each server listens.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

"$root/scripts/stack.sh" up
echo
"$root/scripts/stack.sh" status
echo
echo "To point your own tests at this stack:"
"$root/scripts/stack.sh" env
