#!/usr/bin/env bash
# The example system's demo: brings up the local stack (PostgreSQL, Kafka, a
# MongoDB-protocol server and Redis), starts the customer service on its own
# database, creates and updates customers over HTTP and shows their events
# arriving on Kafka, in order per customer.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

"$root/scripts/stack.sh" up
eval "$("$root/scripts/stack.sh" env)"

echo "==> building the example services"
cargo build --quiet -p example-customer-service --bins
bin="$root/target/debug"

export CUSTOMER_HTTP_ADDR="${CUSTOMER_HTTP_ADDR:-127.0.0.1:8081}"
export CUSTOMER_SERVICE_URL="http://$CUSTOMER_HTTP_ADDR"
# Development passwords of the service's roles; a deployment takes them from its secrets.
export CUSTOMER_DB_OWNER_PASSWORD="${CUSTOMER_DB_OWNER_PASSWORD:-customer-owner-dev}"
export CUSTOMER_DB_RUNTIME_PASSWORD="${CUSTOMER_DB_RUNTIME_PASSWORD:-customer-app-dev}"
log="$root/.dbps/customer-service.log"
echo "==> starting the customer service on $CUSTOMER_HTTP_ADDR (log: .dbps/customer-service.log)"
"$bin/customer-service" >"$log" 2>&1 &
service_pid=$!
stop_service() {
    if kill -0 "$service_pid" 2>/dev/null; then
        kill -TERM "$service_pid" 2>/dev/null || true
        wait "$service_pid" 2>/dev/null || true
    fi
}
trap stop_service EXIT

echo "==> driving it over HTTP and watching customer.customer.events"
if ! "$bin/customer-demo"; then
    echo "demo failed; the service's log ends with:" >&2
    tail -n 30 "$log" >&2
    exit 1
fi
