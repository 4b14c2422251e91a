#!/usr/bin/env bash
# The example system's demo: brings up the local stack (PostgreSQL, Kafka, a
# MongoDB-protocol server, Redis, Mailpit and OpenSearch), builds the customer,
# inventory, purchase-order, quote, email and pipeline services and runs them as
# six processes, each on its own database (PostgreSQL, provisioned; the email
# service's on MongoDB). The narrator (system-demo) starts and stops them, walks through the
# flows of the system's ADR over HTTP, prints the messages that pass on Kafka
# under the flow that caused them, reads the sales rep's email back from
# Mailpit, and ends with a check that the numbers add up. Each service logs to
# .dbps/<service>-service.log.
#
# Every variable below can be set beforehand to override it (ports, passwords,
# timeouts).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

"$root/scripts/stack.sh" up
eval "$("$root/scripts/stack.sh" env)"

echo "==> building the example services and the narrator"
cargo build --quiet \
    -p example-customer-service -p example-inventory-service \
    -p example-purchase-order-service -p example-quote-service \
    -p example-email-service -p example-pipeline-service --bins
cargo build --quiet -p example-system-demo
bin="$root/target/debug"

export CUSTOMER_HTTP_ADDR="${CUSTOMER_HTTP_ADDR:-127.0.0.1:8081}"
export INVENTORY_HTTP_ADDR="${INVENTORY_HTTP_ADDR:-127.0.0.1:8082}"
export PURCHASE_ORDER_HTTP_ADDR="${PURCHASE_ORDER_HTTP_ADDR:-127.0.0.1:8083}"
export QUOTE_HTTP_ADDR="${QUOTE_HTTP_ADDR:-127.0.0.1:8084}"
export EMAIL_HTTP_ADDR="${EMAIL_HTTP_ADDR:-127.0.0.1:8085}"
export PIPELINE_HTTP_ADDR="${PIPELINE_HTTP_ADDR:-127.0.0.1:8086}"
# Development passwords of the services' roles; a deployment takes them from its secrets.
export CUSTOMER_DB_OWNER_PASSWORD="${CUSTOMER_DB_OWNER_PASSWORD:-customer-owner-dev}"
export CUSTOMER_DB_RUNTIME_PASSWORD="${CUSTOMER_DB_RUNTIME_PASSWORD:-customer-app-dev}"
export INVENTORY_DB_OWNER_PASSWORD="${INVENTORY_DB_OWNER_PASSWORD:-inventory-owner-dev}"
export INVENTORY_DB_RUNTIME_PASSWORD="${INVENTORY_DB_RUNTIME_PASSWORD:-inventory-app-dev}"
export PURCHASE_ORDER_DB_OWNER_PASSWORD="${PURCHASE_ORDER_DB_OWNER_PASSWORD:-purchase-order-owner-dev}"
export PURCHASE_ORDER_DB_RUNTIME_PASSWORD="${PURCHASE_ORDER_DB_RUNTIME_PASSWORD:-purchase-order-app-dev}"
export QUOTE_DB_OWNER_PASSWORD="${QUOTE_DB_OWNER_PASSWORD:-quote-owner-dev}"
export QUOTE_DB_RUNTIME_PASSWORD="${QUOTE_DB_RUNTIME_PASSWORD:-quote-app-dev}"
export PIPELINE_DB_OWNER_PASSWORD="${PIPELINE_DB_OWNER_PASSWORD:-pipeline-owner-dev}"
export PIPELINE_DB_RUNTIME_PASSWORD="${PIPELINE_DB_RUNTIME_PASSWORD:-pipeline-app-dev}"
# The quote service reads customers from the customer service and its product catalogue
# from the inventory; a short order step timeout keeps the flow with the purchase-order
# service down quick.
export QUOTE_CUSTOMER_URL="${QUOTE_CUSTOMER_URL:-http://$CUSTOMER_HTTP_ADDR}"
export QUOTE_INVENTORY_URL="${QUOTE_INVENTORY_URL:-http://$INVENTORY_HTTP_ADDR}"
export QUOTE_ORDER_STEP_TIMEOUT_SECS="${QUOTE_ORDER_STEP_TIMEOUT_SECS:-3}"
# The email service: its database on the MongoDB server (DBPS_MONGODB_URI, from the
# stack), the customer service for its index's backfill, and the stack's SMTP server
# (Mailpit) for the sales rep's notifications.
export EMAIL_CUSTOMER_URL="${EMAIL_CUSTOMER_URL:-http://$CUSTOMER_HTTP_ADDR}"
export EMAIL_SMTP_URL="${EMAIL_SMTP_URL:-$DBPS_SMTP_URL}"
# Customers without a credit limit of their own may order up to 10,000.00.
export PURCHASE_ORDER_DEFAULT_LIMIT_CENTS="${PURCHASE_ORDER_DEFAULT_LIMIT_CENTS:-1000000}"

# Where the narrator finds the binaries, writes the services' logs and pids, and names
# the log of the service a failed check points at.
export SYSTEM_DEMO_BIN_DIR="$bin"
export SYSTEM_DEMO_LOG_DIR="$root/.dbps"
export SYSTEM_DEMO_PID_DIR="$root/.dbps/demo"
export SYSTEM_DEMO_BLAME_FILE="$SYSTEM_DEMO_PID_DIR/failed-log"
mkdir -p "$SYSTEM_DEMO_PID_DIR"
rm -f "$SYSTEM_DEMO_BLAME_FILE"

# The narrator stops every service it started. Should it die without doing so, the
# services it left running are stopped here, found by their pid files (and checked to be
# the service binaries, so a reused pid is left alone).
stop_leftovers() {
    local pidfile pid name
    for pidfile in "$SYSTEM_DEMO_PID_DIR"/*.pid; do
        [[ -f "$pidfile" ]] || continue
        pid="$(tr -dc '0-9' <"$pidfile")"
        name="$(basename "$pidfile" .pid)"
        if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null &&
            tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$name"; then
            echo "stopping $name (pid $pid), left running" >&2
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 1 100); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
        fi
        rm -f "$pidfile"
    done
}
trap stop_leftovers EXIT

status=0
"$bin/system-demo" || status=$?
if [[ "$status" -ne 0 ]]; then
    if [[ -s "$SYSTEM_DEMO_BLAME_FILE" ]]; then
        log="$(cat "$SYSTEM_DEMO_BLAME_FILE")"
        echo >&2
        echo "--- the last 30 lines of ${log#"$root"/} ---" >&2
        tail -n 30 "$log" >&2 || true
        echo "--- end of ${log#"$root"/} ---" >&2
    fi
    exit "$status"
fi
