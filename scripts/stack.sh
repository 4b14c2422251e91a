#!/usr/bin/env bash
# Local development stack for dbps: PostgreSQL, Redis, Kafka (KRaft),
# FerretDB (MongoDB wire protocol, its data in that PostgreSQL), Mailpit
# (an SMTP server with an HTTP API to read back what arrived) and OpenSearch
# (search, Elasticsearch-compatible REST API), all as plain processes on
# 127.0.0.1 — no Docker needed.
#
#   scripts/stack.sh up       install what is missing, start everything, wait until ready
#   scripts/stack.sh down     stop what `up` started
#   scripts/stack.sh status   show each server's state (exit 0 all up, 3 otherwise)
#   scripts/stack.sh env      print the DBPS_* variables:  eval "$(scripts/stack.sh env)"
#   scripts/stack.sh env --secure   the same, but the secured endpoints under the usual
#                                   names (TLS, logins):  eval "$(scripts/stack.sh env --secure)"
#   scripts/stack.sh stop  <server>   stop one server (postgres, redis, kafka, ferretdb,
#                                     mailpit, opensearch, toxiproxy; stopping postgres
#                                     stops ferretdb too)
#   scripts/stack.sh stop postgres [fast|immediate]
#                                     pg_ctl stop -m <mode> (default fast; immediate =
#                                     no checkpoint, crash recovery on the next start)
#   scripts/stack.sh start <server>   start one server again and wait until it is ready
#                                     (fault injection: dbps-chaos broker-restart);
#                                     `start toxiproxy` builds Toxiproxy first if needed
#
# State (data, logs, pid files) lives in <checkout>/.dbps/ (git-ignored).
# Downloads and builds are cached in ${DBPS_CACHE_DIR:-$HOME/.cache/dbps}.
#
# Tunables (environment):
#   DBPS_CACHE_DIR          download/build cache            (default: $HOME/.cache/dbps)
#   DBPS_KAFKA_VERSION      org.apache.kafka:kafka_2.13     (default: 4.4.0)
#   DBPS_FERRETDB_VERSION   github.com/FerretDB/FerretDB    (default: v1.24.2)
#   DBPS_MAILPIT_VERSION    github.com/axllent/mailpit      (default: v1.33.1)
#   DBPS_OPENSEARCH_VERSION org.opensearch:opensearch       (default: 2.19.6; 2.x on Java 17)
#   DBPS_TOXIPROXY_VERSION  github.com/Shopify/toxiproxy/v2 (default: v2.12.0)
#   DBPS_JAVA               java binary to run Kafka and OpenSearch with
#                                                           (default: first java >= 17 found)
#   DBPS_KAFKA_HEAP_OPTS    Kafka JVM heap                  (default: -Xmx768m -Xms256m)
#   DBPS_OPENSEARCH_HEAP_OPTS  OpenSearch JVM heap          (default: -Xmx768m -Xms256m)
#   DBPS_STACK_TIMEOUT      readiness deadline per server, seconds (default: 120)
#
# Mailpit: SMTP on 127.0.0.1:21025 (any sender and recipient, no auth needed,
# messages up to 50 MB), its HTTP API on 127.0.0.1:28025 (/api/v1/...); messages
# are kept in .dbps/mailpit/mailpit.db (they survive a restart; the oldest go
# beyond 2000). Built once with `go install` of its module; the web UI's
# JavaScript is not part of the module, so the UI page stays blank: read mail
# through the API (dbps-testkit's mailpit() does).
#
# OpenSearch: HTTP (REST API) on 127.0.0.1:29200, transport on 127.0.0.1:29300,
# a single node without the security plugin (plain HTTP, no login). Its jars
# come from Maven Central like Kafka's (scripts/opensearch/pom.xml), started by
# a small launcher (scripts/opensearch/DbpsOpenSearch.java, compiled once with
# the JDK's javac) instead of a distribution. New indices get no replicas (set
# through the cluster settings API after each start), so they are green.
# Data in .dbps/opensearch/data.
#
# Kafka has a second client listener, PROXIED, for traffic through a fault
# proxy: it listens on 127.0.0.1:29094 but advertises 127.0.0.1:29095, where the
# chaos harness's Toxiproxy proxy listens (forwarding to 29094). A client that
# bootstraps at 127.0.0.1:29095 is told the broker is at 127.0.0.1:29095, so all
# its traffic stays on the proxy. Nothing listens on 29095 unless that proxy
# exists. The normal listener (127.0.0.1:29092) is unaffected.
#
# Secured endpoints ("secured like production"), next to the plain ones, which
# stay exactly as they are (the quick start and the tests use those):
#   PostgreSQL  TLS on the same port 127.0.0.1:25432 (optional: plain still works);
#               sslmode=verify-full against the stack's CA   (DBPS_POSTGRES_TLS_URL)
#   Redis       TLS on 127.0.0.1:26380 (no client certificates), ACL user dbps-admin
#               (DBPS_REDIS_TLS_URL, DBPS_REDIS_ADMIN_*); the 'default' user keeps
#               working without a password, as on 26379
#   Kafka       listener SECURE on 127.0.0.1:29096: SASL_SSL, SCRAM-SHA-512, user
#               dbps-admin (DBPS_KAFKA_SECURE_BROKERS, DBPS_KAFKA_ADMIN_*); client
#               settings for it in .dbps/kafka/admin-client.properties (0600, for
#               kafka tools' --command-config). ACLs are enforced (StandardAuthorizer,
#               allow.everyone.if.no.acl.found=false); super users are dbps-admin
#               and ANONYMOUS, the principal of the PLAINTEXT, PROXIED and
#               CONTROLLER listeners — a dev convenience of this stack only
#               (production has no plaintext listener).
# The CA ("dbps dev stack CA", 10 years; ca.crt = DBPS_TLS_CA_FILE), the server
# certificate (IP:127.0.0.1, DNS:localhost) and the admin passwords (random,
# kafka-admin.password and redis-admin.password) are made once with openssl in
# .dbps/tls/ — git-ignored, never committed; keys and secrets mode 0600. `up`
# and `start` print no secret; only `env` does. Delete .dbps/tls and restart
# postgres, redis and kafka to get new ones (a server still running with the
# old files fails its readiness check with a hint to restart it).
#
# Toxiproxy (a TCP fault proxy): on demand only, not part of `up` or of the
# exit code of `status` — `scripts/stack.sh start toxiproxy` builds it once
# with `go install` of its module (like Mailpit) and starts its HTTP API on
# 127.0.0.1:28474 (log and pid file in .dbps/toxiproxy/). The script creates no
# proxies; the chaos harness creates them through the API. `down` stops it too.
#
# Users with Docker can use docker-compose.yml at the repo root instead.

set -euo pipefail

# ---------------------------------------------------------------------------
# Layout and fixed settings
# ---------------------------------------------------------------------------

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
ROOT="$(cd -- "$SCRIPT_DIR/.." && pwd -P)"
DBPS_DIR="$ROOT/.dbps"
CACHE_DIR="${DBPS_CACHE_DIR:-${HOME:-/root}/.cache/dbps}"

HOST=127.0.0.1
PG_PORT=25432
REDIS_PORT=26379
KAFKA_PORT=29092
KAFKA_CONTROLLER_PORT=29093
FERRET_PORT=27117
FERRET_DEBUG_PORT=28088
MAILPIT_SMTP_PORT=21025
MAILPIT_HTTP_PORT=28025
OPENSEARCH_PORT=29200
OPENSEARCH_TRANSPORT_PORT=29300
KAFKA_PROXIED_PORT=29094            # Kafka's PROXIED listener (the proxy's upstream)
KAFKA_PROXIED_ADVERTISED_PORT=29095 # where the harness's Toxiproxy proxy listens
TOXIPROXY_PORT=28474                # Toxiproxy HTTP API
REDIS_TLS_PORT=26380                # Redis over TLS (same server as REDIS_PORT)
KAFKA_SECURE_PORT=29096             # Kafka's SECURE listener (SASL_SSL, SCRAM-SHA-512)

PG_USER=dbps
PG_PASSWORD=dbps

KAFKA_VERSION="${DBPS_KAFKA_VERSION:-4.4.0}"
FERRET_VERSION="${DBPS_FERRETDB_VERSION:-v1.24.2}"
MAILPIT_VERSION="${DBPS_MAILPIT_VERSION:-v1.33.1}"
OPENSEARCH_VERSION="${DBPS_OPENSEARCH_VERSION:-2.19.6}"
TOXIPROXY_VERSION="${DBPS_TOXIPROXY_VERSION:-v2.12.0}"
KAFKA_HEAP_OPTS="${DBPS_KAFKA_HEAP_OPTS:--Xmx768m -Xms256m}"
OPENSEARCH_HEAP_OPTS="${DBPS_OPENSEARCH_HEAP_OPTS:--Xmx768m -Xms256m}"
TIMEOUT="${DBPS_STACK_TIMEOUT:-120}"

PG_DIR="$DBPS_DIR/postgres"          # may become a symlink, see pg_prepare_dirs
REDIS_DIR="$DBPS_DIR/redis"
KAFKA_DIR="$DBPS_DIR/kafka"
FERRET_DIR="$DBPS_DIR/ferretdb"
MAILPIT_DIR="$DBPS_DIR/mailpit"
OPENSEARCH_DIR="$DBPS_DIR/opensearch"
TOXIPROXY_DIR="$DBPS_DIR/toxiproxy"
TLS_DIR="$DBPS_DIR/tls"              # CA, server certificate and the admin secrets

# TLS material and secrets (made once by tls_ensure, kept in TLS_DIR).
TLS_CA_KEY="$TLS_DIR/ca.key"
TLS_CA_CRT="$TLS_DIR/ca.crt"
TLS_SERVER_KEY="$TLS_DIR/server.key"
TLS_SERVER_CRT="$TLS_DIR/server.crt"
TLS_KAFKA_PEM="$TLS_DIR/server-kafka.pem" # PKCS#8 key + certificate chain (Kafka's PEM keystore)
ADMIN_USER=dbps-admin                     # admin of Kafka's SECURE listener and of Redis
KAFKA_ADMIN_PASSWORD_FILE="$TLS_DIR/kafka-admin.password"
REDIS_ADMIN_PASSWORD_FILE="$TLS_DIR/redis-admin.password"

KAFKA_LIBS="$CACHE_DIR/kafka-$KAFKA_VERSION/libs"
FERRET_BIN="$CACHE_DIR/ferretdb-$FERRET_VERSION/bin/ferretdb"
MAILPIT_BIN="$CACHE_DIR/mailpit-$MAILPIT_VERSION/bin/mailpit"
OPENSEARCH_LIBS="$CACHE_DIR/opensearch-$OPENSEARCH_VERSION/libs"
OPENSEARCH_CLASSES="$CACHE_DIR/opensearch-$OPENSEARCH_VERSION/launcher"
TOXIPROXY_BIN="$CACHE_DIR/toxiproxy-$TOXIPROXY_VERSION/bin/toxiproxy-server"

SERVERS=(postgres redis kafka ferretdb mailpit opensearch) # `up`; toxiproxy is on demand

# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------

is_root() { [[ "$(id -u)" -eq 0 ]]; }

info() { printf '%s\n' "$*"; }
warn() { printf 'stack.sh: warning: %s\n' "$*" >&2; }
die() { printf 'stack.sh: error: %s\n' "$*" >&2; exit 1; }

# Path relative to the checkout root, for messages.
rel() {
  case "$1" in
    "$ROOT"/*) printf '%s' "${1#"$ROOT"/}" ;;
    *) printf '%s' "$1" ;;
  esac
}

line() { # name state address [log]
  if [[ -n "${4:-}" ]]; then
    printf '%-10s %-9s %-21s (log: %s)\n' "$1" "$2" "$3" "$(rel "$4")"
  else
    printf '%-10s %-9s %s\n' "$1" "$2" "$3"
  fi
}

# Report a failed server: which one, where its log is, and the log's tail.
fail_server() { # name log message
  local name="$1" log="$2" msg="$3"
  printf '\n%-10s FAILED    %s\n' "$name" "$msg" >&2
  if [[ -f "$log" ]]; then
    printf -- '--- last 20 lines of %s ---\n' "$(rel "$log")" >&2
    tail -n 20 "$log" >&2 || true
    printf -- '--- end of %s ---\n' "$(rel "$log")" >&2
  else
    printf '(no log file at %s)\n' "$(rel "$log")" >&2
  fi
  exit 1
}

# True if something accepts TCP connections on HOST:port.
port_open() {
  # shellcheck disable=SC2016 # expanded by the inner bash
  timeout 3 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$HOST" "$1" 2>/dev/null
}

pid_alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }

# Pid from a pid file if that process is alive and its command line contains
# the expected word (guards against pid reuse after a reboot).
live_pid() { # pidfile expected-word
  local pidfile="$1" word="$2" pid
  [[ -f "$pidfile" ]] || return 1
  pid="$(head -n 1 "$pidfile" 2>/dev/null | tr -dc '0-9')"
  pid_alive "$pid" || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$word" || return 1
  printf '%s' "$pid"
}

# Prefix for `bash -c` that closes every inherited fd above 2, so that servers
# keep neither our lock (fd 9) nor any pipe of whoever ran us (a CI runner
# waiting for EOF on its output pipe would otherwise wait forever).
# shellcheck disable=SC2016 # expanded by the inner bash
CLOSE_FDS='for f in /proc/$$/fd/*; do n=${f##*/}; [ "$n" -gt 2 ] 2>/dev/null && eval "exec $n>&-"; done 2>/dev/null'

# Run a command with inherited fds closed (see CLOSE_FDS).
# shellcheck disable=SC2016 # expanded by the inner bash
run_detached() { bash -c "$CLOSE_FDS"'; exec "$@"' run_detached "$@"; }

# Start a long-running command detached from this shell (own session, no
# stdin), logging to a file; the pid file gets the pid of the command itself.
spawn() { # pidfile logfile cmd...
  local pidfile="$1" logfile="$2"
  shift 2
  rm -f "$pidfile"
  # shellcheck disable=SC2016 # expanded by the inner bash
  setsid bash -c "$CLOSE_FDS"'; echo "$$" >"$0"; exec "$@"' "$pidfile" "$@" >>"$logfile" 2>&1 </dev/null 9>&- &
  local i
  for ((i = 0; i < 50; i++)); do
    [[ -s "$pidfile" ]] && return 0
    sleep 0.1
  done
  return 1
}

# Send SIGTERM to a pid and wait for it to exit (SIGKILL after $2 seconds).
stop_pid() { # pid grace-seconds
  local pid="$1" grace="$2" deadline
  kill -TERM "$pid" 2>/dev/null || return 0
  deadline=$((SECONDS + grace))
  while pid_alive "$pid"; do
    if ((SECONDS >= deadline)); then
      warn "pid $pid did not exit after ${grace}s, sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 1
      break
    fi
    sleep 0.2
  done
}

# Keep the previous log around as <log>.1 and start a fresh one.
rotate_log() {
  [[ -f "$1" ]] && mv -f "$1" "$1.1"
  : >"$1"
}

# ---------------------------------------------------------------------------
# Installing what is missing
# ---------------------------------------------------------------------------

APT_UPDATED=0
apt_install() { # packages...
  local sudo=()
  if ! is_root; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      sudo=(sudo -n)
    else
      die "missing packages: $*; install them with: sudo apt-get install -y $*"
    fi
  fi
  command -v apt-get >/dev/null 2>&1 || die "missing packages: $* (and no apt-get to install them)"
  info "installing: $* (apt-get)"
  local log="$CACHE_DIR/apt.log"
  mkdir -p "$CACHE_DIR"
  if [[ "$APT_UPDATED" -eq 0 ]]; then
    if ! "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >"$log" 2>&1; then
      tail -n 20 "$log" >&2
      die "apt-get update failed (log: $log)"
    fi
    APT_UPDATED=1
  fi
  if ! "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >>"$log" 2>&1; then
    tail -n 20 "$log" >&2
    die "apt-get install $* failed (log: $log)"
  fi
}

# Newest PostgreSQL server bin dir (Debian layout), or pg_config's.
find_pg_bin() {
  local d best="" best_ver=0 v
  for d in /usr/lib/postgresql/*/bin; do
    [[ -x "$d/initdb" && -x "$d/pg_ctl" ]] || continue
    v="$(basename "$(dirname "$d")")"
    [[ "$v" =~ ^[0-9]+$ ]] || continue
    if ((v > best_ver)); then best_ver="$v" best="$d"; fi
  done
  if [[ -z "$best" ]] && command -v pg_config >/dev/null 2>&1; then
    d="$(pg_config --bindir 2>/dev/null || true)"
    [[ -n "$d" && -x "$d/initdb" && -x "$d/pg_ctl" ]] && best="$d"
  fi
  [[ -n "$best" ]] && printf '%s' "$best"
}

java_major() { # java-binary -> spec version major (e.g. 17)
  "$1" -XshowSettings:properties -version 2>&1 |
    awk -F'= ' '/java.specification.version/ { v=$2; sub(/^1\./, "", v); sub(/\..*/, "", v); print v; exit }'
}

# First java >= 17: $DBPS_JAVA, $JAVA_HOME, PATH, then /usr/lib/jvm (newest first).
find_java() {
  local j m cands=()
  [[ -n "${DBPS_JAVA:-}" ]] && cands+=("$DBPS_JAVA")
  [[ -n "${JAVA_HOME:-}" ]] && cands+=("$JAVA_HOME/bin/java")
  command -v java >/dev/null 2>&1 && cands+=("$(command -v java)")
  for j in /usr/lib/jvm/*/bin/java; do cands+=("$j"); done
  for j in "${cands[@]}"; do
    [[ -x "$j" ]] || continue
    m="$(java_major "$j" || true)"
    if [[ "$m" =~ ^[0-9]+$ ]] && ((m >= 17)); then
      printf '%s' "$j"
      return 0
    fi
  done
  return 1
}

# The javac of the JDK that $1 (a java binary) belongs to, else javac on PATH.
find_javac() { # java-binary
  local j
  j="$(dirname -- "$(readlink -f -- "$1")")/javac"
  if [[ -x "$j" ]]; then
    printf '%s' "$j"
  elif command -v javac >/dev/null 2>&1; then
    command -v javac
  else
    return 1
  fi
}

find_go() {
  if command -v go >/dev/null 2>&1; then
    command -v go
  elif [[ -x /usr/local/go/bin/go ]]; then
    printf '%s' /usr/local/go/bin/go
  else
    return 1
  fi
}

ensure_packages() {
  local pkgs=()
  [[ -n "$(find_pg_bin)" ]] || pkgs+=(postgresql)
  { command -v redis-server && command -v redis-cli; } >/dev/null 2>&1 || pkgs+=(redis-server)
  command -v mvn >/dev/null 2>&1 || pkgs+=(maven)
  # The OpenSearch launcher is compiled once, so a JDK rather than only a JRE.
  if ! JAVA="$(find_java)" || ! find_javac "$JAVA" >/dev/null; then
    pkgs+=(openjdk-17-jdk-headless)
  fi
  if ((${#pkgs[@]})); then apt_install "${pkgs[@]}"; fi

  PG_BIN="$(find_pg_bin)" || true
  [[ -n "$PG_BIN" ]] || die "no PostgreSQL server found (looked in /usr/lib/postgresql/*/bin and pg_config --bindir)"
  JAVA="$(find_java)" || die "no java >= 17 found (Kafka 4 needs it); set DBPS_JAVA=/path/to/java"
  command -v redis-server >/dev/null 2>&1 || die "redis-server not found after install"
  command -v mvn >/dev/null 2>&1 || die "mvn not found after install"
  find_javac "$JAVA" >/dev/null || die "no javac next to $JAVA nor on PATH (needed once to compile the OpenSearch launcher): install a JDK, e.g. openjdk-17-jdk-headless"
  GO="$(find_go)" || die "go not found (needed once to build FerretDB $FERRET_VERSION and Mailpit $MAILPIT_VERSION; FerretDB 1.24 needs Go >= 1.24, Mailpit 1.33 Go >= 1.26): install Go and put it on PATH"
}

# Kafka jars via Maven (scripts/kafka/pom.xml) into the cache, once per
# version and pom content.
ensure_kafka_libs() {
  local pom="$SCRIPT_DIR/kafka/pom.xml" sum tmp log
  sum="$(cksum <"$pom" | cut -d' ' -f1)"
  if [[ -f "$KAFKA_LIBS/.complete" && "$(cat "$KAFKA_LIBS/.complete")" == "$sum" ]]; then
    return 0
  fi
  info "kafka     fetching Apache Kafka $KAFKA_VERSION jars with Maven into $KAFKA_LIBS"
  mkdir -p "$(dirname "$KAFKA_LIBS")"
  tmp="$(dirname "$KAFKA_LIBS")/libs.tmp.$$"
  log="$(dirname "$KAFKA_LIBS")/mvn.log"
  rm -rf "$tmp"
  if ! (cd "$SCRIPT_DIR/kafka" && mvn -q -B -f "$pom" -Dkafka.version="$KAFKA_VERSION" \
    dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp") >"$log" 2>&1; then
    rm -rf "$tmp"
    fail_server kafka "$log" "could not resolve org.apache.kafka:kafka_2.13:$KAFKA_VERSION with Maven"
  fi
  [[ -f "$tmp/kafka_2.13-$KAFKA_VERSION.jar" ]] || fail_server kafka "$log" "Maven did not produce kafka_2.13-$KAFKA_VERSION.jar"
  printf '%s\n' "$sum" >"$tmp/.complete"
  rm -rf "$KAFKA_LIBS"
  mv "$tmp" "$KAFKA_LIBS"
}

# OpenSearch jars via Maven (scripts/opensearch/pom.xml) into the cache and the
# launcher compiled next to them, once per version and pom/launcher content.
ensure_opensearch_libs() {
  local pom="$SCRIPT_DIR/opensearch/pom.xml" src="$SCRIPT_DIR/opensearch/DbpsOpenSearch.java"
  local sum tmp log javac
  sum="$(cat "$pom" "$src" | cksum | cut -d' ' -f1)"
  if [[ -f "$OPENSEARCH_LIBS/.complete" && "$(cat "$OPENSEARCH_LIBS/.complete")" == "$sum" &&
    -f "$OPENSEARCH_CLASSES/DbpsOpenSearch.class" ]]; then
    return 0
  fi
  info "opensearch fetching OpenSearch $OPENSEARCH_VERSION jars with Maven into $OPENSEARCH_LIBS"
  mkdir -p "$(dirname "$OPENSEARCH_LIBS")"
  tmp="$(dirname "$OPENSEARCH_LIBS")/libs.tmp.$$"
  log="$(dirname "$OPENSEARCH_LIBS")/mvn.log"
  rm -rf "$tmp"
  if ! (cd "$SCRIPT_DIR/opensearch" && mvn -q -B -f "$pom" -Dopensearch.version="$OPENSEARCH_VERSION" \
    dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp") >"$log" 2>&1; then
    rm -rf "$tmp"
    fail_server opensearch "$log" "could not resolve org.opensearch:opensearch:$OPENSEARCH_VERSION with Maven"
  fi
  [[ -f "$tmp/opensearch-$OPENSEARCH_VERSION.jar" ]] ||
    fail_server opensearch "$log" "Maven did not produce opensearch-$OPENSEARCH_VERSION.jar"
  javac="$(find_javac "$JAVA")" || die "no javac found to compile the OpenSearch launcher"
  log="$(dirname "$OPENSEARCH_LIBS")/javac.log"
  rm -rf "$tmp.classes"
  if ! "$javac" -nowarn -encoding UTF-8 -d "$tmp.classes" -cp "$tmp/*" "$src" >"$log" 2>&1; then
    rm -rf "$tmp" "$tmp.classes"
    fail_server opensearch "$log" "could not compile $(rel "$src") against OpenSearch $OPENSEARCH_VERSION"
  fi
  printf '%s\n' "$sum" >"$tmp/.complete"
  rm -rf "$OPENSEARCH_LIBS" "$OPENSEARCH_CLASSES"
  mv "$tmp.classes" "$OPENSEARCH_CLASSES"
  mv "$tmp" "$OPENSEARCH_LIBS"
}

# FerretDB binary built with the Go toolchain into the cache, once per version.
# `go install ...@version` alone is not enough: the module ships without
# build/version/version.txt (normally generated from git), and the binary then
# panics at start-up. So build from a copy of the module source with that file
# written.
build_ferretdb() {
  local src dir
  src="$(cd "$CACHE_DIR" && "$GO" mod download -json "github.com/FerretDB/FerretDB@$FERRET_VERSION" |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')"
  [[ -n "$src" && -d "$src" ]] || { echo "go mod download did not report a source dir" >&2; return 1; }
  dir="$CACHE_DIR/ferretdb-$FERRET_VERSION/src.$BASHPID"
  # runs in a background subshell: clean up however it ends
  trap 'rm -rf "$dir" "$FERRET_BIN.tmp"' EXIT
  rm -rf "$dir"
  mkdir -p "$(dirname "$dir")"
  cp -R "$src" "$dir"
  chmod -R u+w "$dir"
  printf '%s\n' "$FERRET_VERSION" >"$dir/build/version/version.txt"
  printf '%s\n' "dbps-stack" >"$dir/build/version/package.txt"
  (cd "$dir" && CGO_ENABLED=0 GOFLAGS=-buildvcs=false "$GO" build -trimpath -o "$FERRET_BIN.tmp" ./cmd/ferretdb)
  "$FERRET_BIN.tmp" --version >/dev/null
  mv -f "$FERRET_BIN.tmp" "$FERRET_BIN"
}

FERRET_BUILD_PID=""
FERRET_BUILD_LOG="$CACHE_DIR/ferretdb-$FERRET_VERSION/build.log"
start_ferretdb_build() {
  [[ -x "$FERRET_BIN" ]] && return 0
  info "ferretdb  building FerretDB $FERRET_VERSION with $("$GO" env GOVERSION) (one-time, ~1-2 min) into $(dirname "$FERRET_BIN")"
  mkdir -p "$(dirname "$FERRET_BIN")"
  : >"$FERRET_BUILD_LOG"
  build_ferretdb >>"$FERRET_BUILD_LOG" 2>&1 </dev/null 9>&- &
  FERRET_BUILD_PID=$!
}
finish_ferretdb_build() {
  [[ -n "$FERRET_BUILD_PID" ]] || return 0
  if ! wait "$FERRET_BUILD_PID"; then
    fail_server ferretdb "$FERRET_BUILD_LOG" "building FerretDB $FERRET_VERSION failed (if Go is too old: FerretDB 1.24 needs Go >= 1.24)"
  fi
  FERRET_BUILD_PID=""
}

# Mailpit binary built with the Go toolchain into the cache, once per version:
# a plain `go install` of its module at the pinned version (the module proxy
# serves it; GOBIN points into the cache). The version is stamped in with the
# same -X flag Mailpit's own release builds use. The module does not carry the
# web UI's compiled JavaScript (built with npm upstream); the SMTP server and the
# HTTP API do not need it.
build_mailpit() {
  local gobin
  gobin="$CACHE_DIR/mailpit-$MAILPIT_VERSION/gobin.$BASHPID"
  # runs in a background subshell: clean up however it ends
  trap 'rm -rf "$gobin"' EXIT
  rm -rf "$gobin"
  mkdir -p "$gobin"
  (cd "$CACHE_DIR" && GOBIN="$gobin" CGO_ENABLED=0 GOFLAGS=-buildvcs=false "$GO" install -trimpath \
    -ldflags "-s -w -X github.com/axllent/mailpit/config.Version=$MAILPIT_VERSION" \
    "github.com/axllent/mailpit@$MAILPIT_VERSION")
  "$gobin/mailpit" version --no-release-check
  mkdir -p "$(dirname "$MAILPIT_BIN")"
  mv -f "$gobin/mailpit" "$MAILPIT_BIN"
}

MAILPIT_BUILD_PID=""
MAILPIT_BUILD_LOG="$CACHE_DIR/mailpit-$MAILPIT_VERSION/build.log"
start_mailpit_build() {
  [[ -x "$MAILPIT_BIN" ]] && return 0
  info "mailpit   building Mailpit $MAILPIT_VERSION with $("$GO" env GOVERSION) (one-time, ~1-2 min) into $(dirname "$MAILPIT_BIN")"
  mkdir -p "$(dirname "$MAILPIT_BIN")"
  : >"$MAILPIT_BUILD_LOG"
  build_mailpit >>"$MAILPIT_BUILD_LOG" 2>&1 </dev/null 9>&- &
  MAILPIT_BUILD_PID=$!
}
finish_mailpit_build() {
  [[ -n "$MAILPIT_BUILD_PID" ]] || return 0
  if ! wait "$MAILPIT_BUILD_PID"; then
    fail_server mailpit "$MAILPIT_BUILD_LOG" "building Mailpit $MAILPIT_VERSION failed (if Go is too old: Mailpit 1.33 needs Go >= 1.26)"
  fi
  MAILPIT_BUILD_PID=""
}

# Toxiproxy server built with the Go toolchain into the cache, once per version
# (only when `start toxiproxy` needs it): a plain `go install` of its cmd/server
# package, like Mailpit. The binary comes out named `server`; it is kept as
# toxiproxy-server. The version is stamped in the way upstream release builds do
# (without the leading v), so GET /version reports it.
build_toxiproxy() {
  local gobin
  gobin="$CACHE_DIR/toxiproxy-$TOXIPROXY_VERSION/gobin.$BASHPID"
  # runs in a background subshell: clean up however it ends
  trap 'rm -rf "$gobin"' EXIT
  rm -rf "$gobin"
  mkdir -p "$gobin"
  (cd "$CACHE_DIR" && GOBIN="$gobin" CGO_ENABLED=0 GOFLAGS=-buildvcs=false "$GO" install -trimpath \
    -ldflags "-s -w -X github.com/Shopify/toxiproxy/v2.Version=${TOXIPROXY_VERSION#v}" \
    "github.com/Shopify/toxiproxy/v2/cmd/server@$TOXIPROXY_VERSION")
  "$gobin/server" -version
  mkdir -p "$(dirname "$TOXIPROXY_BIN")"
  mv -f "$gobin/server" "$TOXIPROXY_BIN"
}

TOXIPROXY_BUILD_PID=""
TOXIPROXY_BUILD_LOG="$CACHE_DIR/toxiproxy-$TOXIPROXY_VERSION/build.log"
start_toxiproxy_build() {
  [[ -x "$TOXIPROXY_BIN" ]] && return 0
  info "toxiproxy building Toxiproxy $TOXIPROXY_VERSION with $("$GO" env GOVERSION) (one-time, ~1 min) into $(dirname "$TOXIPROXY_BIN")"
  mkdir -p "$(dirname "$TOXIPROXY_BIN")"
  : >"$TOXIPROXY_BUILD_LOG"
  build_toxiproxy >>"$TOXIPROXY_BUILD_LOG" 2>&1 </dev/null 9>&- &
  TOXIPROXY_BUILD_PID=$!
}
finish_toxiproxy_build() {
  [[ -n "$TOXIPROXY_BUILD_PID" ]] || return 0
  if ! wait "$TOXIPROXY_BUILD_PID"; then
    fail_server toxiproxy "$TOXIPROXY_BUILD_LOG" "building Toxiproxy $TOXIPROXY_VERSION failed"
  fi
  TOXIPROXY_BUILD_PID=""
}

# ---------------------------------------------------------------------------
# TLS material and secrets for the secured endpoints (made once, in .dbps/tls)
# ---------------------------------------------------------------------------

# A private CA ("dbps dev stack CA", 10 years) and one server certificate it
# signs, for IP:127.0.0.1 and DNS:localhost (serverAuth), used by PostgreSQL,
# Redis and Kafka alike; plus the admin passwords of Kafka's SECURE listener
# and of Redis. Keys and secrets are mode 0600. Only what is missing is made:
# a new CA means a new server certificate too (a server certificate that the
# current CA did not sign is replaced), and Kafka's PEM keystore follows the
# server certificate. Servers pick up new files when they (re)start.
tls_ensure() {
  local log="$TLS_DIR/openssl.log" ext serial
  command -v openssl >/dev/null 2>&1 ||
    die "openssl not found (needed to make the stack's TLS certificates); install it: apt-get install openssl"
  mkdir -p "$TLS_DIR"
  chmod 755 "$TLS_DIR"
  if [[ ! -s "$TLS_CA_KEY" || ! -s "$TLS_CA_CRT" ]]; then
    info "tls       creating the dev stack CA in $(rel "$TLS_DIR") (ca.crt; 10 years)"
    rm -f "$TLS_CA_KEY" "$TLS_CA_CRT" "$TLS_SERVER_KEY" "$TLS_SERVER_CRT" "$TLS_KAFKA_PEM"
    : >"$log"
    if ! (umask 077 && openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$TLS_CA_KEY.tmp" &&
      openssl req -x509 -new -sha256 -days 3650 -key "$TLS_CA_KEY.tmp" -subj "/CN=dbps dev stack CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -out "$TLS_CA_CRT.tmp") >>"$log" 2>&1; then
      rm -f "$TLS_CA_KEY.tmp" "$TLS_CA_CRT.tmp"
      fail_server tls "$log" "could not create the CA with openssl"
    fi
    chmod 600 "$TLS_CA_KEY.tmp"
    chmod 644 "$TLS_CA_CRT.tmp"
    mv -f "$TLS_CA_KEY.tmp" "$TLS_CA_KEY"
    mv -f "$TLS_CA_CRT.tmp" "$TLS_CA_CRT"
  fi
  if [[ ! -s "$TLS_SERVER_KEY" || ! -s "$TLS_SERVER_CRT" ]] ||
    ! openssl verify -CAfile "$TLS_CA_CRT" "$TLS_SERVER_CRT" >/dev/null 2>&1; then
    info "tls       creating the server certificate (IP:$HOST, DNS:localhost) signed by $(rel "$TLS_CA_CRT")"
    rm -f "$TLS_SERVER_KEY" "$TLS_SERVER_CRT" "$TLS_KAFKA_PEM"
    ext="$TLS_DIR/server.ext"
    printf '%s\n' "basicConstraints=critical,CA:FALSE" \
      "keyUsage=critical,digitalSignature,keyEncipherment" \
      "extendedKeyUsage=serverAuth" \
      "subjectAltName=IP:$HOST,DNS:localhost" >"$ext"
    serial="0x$(openssl rand -hex 16)"
    if ! (umask 077 && openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$TLS_SERVER_KEY.tmp" &&
      openssl req -new -sha256 -key "$TLS_SERVER_KEY.tmp" -subj "/CN=localhost" -out "$TLS_DIR/server.csr" &&
      openssl x509 -req -sha256 -days 3650 -in "$TLS_DIR/server.csr" -CA "$TLS_CA_CRT" -CAkey "$TLS_CA_KEY" \
        -set_serial "$serial" -extfile "$ext" -out "$TLS_SERVER_CRT.tmp") >>"$log" 2>&1; then
      rm -f "$TLS_SERVER_KEY.tmp" "$TLS_SERVER_CRT.tmp" "$TLS_DIR/server.csr"
      fail_server tls "$log" "could not create the server certificate with openssl"
    fi
    rm -f "$TLS_DIR/server.csr" "$ext"
    chmod 600 "$TLS_SERVER_KEY.tmp"
    chmod 644 "$TLS_SERVER_CRT.tmp"
    mv -f "$TLS_SERVER_KEY.tmp" "$TLS_SERVER_KEY"
    mv -f "$TLS_SERVER_CRT.tmp" "$TLS_SERVER_CRT"
  fi
  # Kafka's PEM keystore: the unencrypted PKCS#8 key (what genpkey writes),
  # then the certificate chain (server, CA).
  if [[ ! -s "$TLS_KAFKA_PEM" || "$TLS_SERVER_CRT" -nt "$TLS_KAFKA_PEM" ]]; then
    (umask 077 && cat "$TLS_SERVER_KEY" "$TLS_SERVER_CRT" "$TLS_CA_CRT" >"$TLS_KAFKA_PEM.tmp")
    chmod 600 "$TLS_KAFKA_PEM.tmp"
    mv -f "$TLS_KAFKA_PEM.tmp" "$TLS_KAFKA_PEM"
  fi
  secret_ensure "$KAFKA_ADMIN_PASSWORD_FILE"
  secret_ensure "$REDIS_ADMIN_PASSWORD_FILE"
}

# A random password (32 hex digits) in a 0600 file, unless the file has one.
secret_ensure() { # file
  [[ -s "$1" ]] && return 0
  (umask 077 && openssl rand -hex 16 >"$1.tmp") || die "openssl rand failed"
  chmod 600 "$1.tmp"
  mv -f "$1.tmp" "$1"
}

# The secret in a file (never printed by up/start/status, only by `env`).
secret_read() { # file
  local s
  s="$(head -n 1 "$1" 2>/dev/null | tr -dc '0-9A-Za-z')"
  [[ -n "$s" ]] || return 1
  printf '%s' "$s"
}

# ---------------------------------------------------------------------------
# PostgreSQL (own cluster in .dbps/postgres/data)
# ---------------------------------------------------------------------------

PG_BIN=""
PG_LOG="$PG_DIR/postgres.log"

# Run a command as the cluster owner: `postgres` when we are root (initdb and
# postgres refuse to run as root), else the current user.
pg_as() {
  if is_root; then
    (cd / && runuser -u postgres -- "$@")
  else
    "$@"
  fi
}

# Resolve PG_DIR (and paths under it) to where the cluster really lives.
pg_paths() {
  local real="$PG_DIR"
  [[ -L "$PG_DIR" ]] && real="$(readlink -f "$PG_DIR")"
  PG_REAL="$real"
  PG_DATA="$real/data"
  PG_LOG="$real/postgres.log"
  PG_SOCK="$real/run"
  # A unix socket path must fit in 107 bytes.
  if ((${#PG_SOCK} + 16 > 100)); then
    PG_SOCK="/tmp/dbps-pg-$(printf '%s' "$ROOT" | cksum | cut -d' ' -f1)"
  fi
}

pg_prepare_dirs() {
  if [[ ! -e "$PG_DIR" ]]; then
    mkdir -p "$DBPS_DIR"
    if is_root && ! runuser -u postgres -- test -x "$DBPS_DIR" 2>/dev/null; then
      # The postgres user cannot reach the checkout (e.g. it is under a
      # mode-700 home directory): keep the cluster outside and link to it.
      local alt
      alt="/var/tmp/dbps-postgres-$(printf '%s' "$ROOT" | cksum | cut -d' ' -f1)"
      warn "user 'postgres' cannot traverse $(dirname "$DBPS_DIR"); keeping the cluster in $alt (linked from .dbps/postgres)"
      mkdir -p "$alt"
      ln -s "$alt" "$PG_DIR"
    else
      mkdir -p "$PG_DIR"
    fi
  fi
  pg_paths
  mkdir -p "$PG_REAL" "$PG_SOCK"
  if is_root; then
    id postgres >/dev/null 2>&1 || die "postgres: running as root, but there is no 'postgres' user to run the server as"
    chown postgres:postgres "$PG_REAL" "$PG_SOCK"
    [[ -d "$PG_DATA" ]] && chown -R postgres:postgres "$PG_DATA"
    [[ -f "$PG_LOG" ]] && chown postgres:postgres "$PG_LOG"
    runuser -u postgres -- test -w "$PG_REAL" 2>/dev/null ||
      die "postgres: user 'postgres' cannot write to $PG_REAL (is a parent directory not traversable?)"
  fi
  chmod 700 "$PG_SOCK"
}

pg_pid() {
  pg_paths
  local pid
  [[ -f "$PG_DATA/postmaster.pid" ]] || return 1
  pid="$(head -n 1 "$PG_DATA/postmaster.pid" | tr -dc '0-9')"
  pid_alive "$pid" || return 1
  printf '%s' "$pid"
}

pg_probe() {
  "$PG_BIN/pg_isready" -q -h "$HOST" -p "$PG_PORT" -t 2 >/dev/null 2>&1 || return 1
  [[ "$(PGPASSWORD="$PG_PASSWORD" PGCONNECT_TIMEOUT=3 "$PG_BIN/psql" -X -q -A -t -w \
    -h "$HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -c 'select 1' 2>/dev/null)" == 1 ]]
}

# Over TLS, the server certificate checked against the stack's CA
# (sslmode=verify-full), and the session really encrypted.
pg_tls_probe() {
  [[ "$(PGPASSWORD="$PG_PASSWORD" PGCONNECT_TIMEOUT=3 PGSSLMODE=verify-full PGSSLROOTCERT="$TLS_CA_CRT" \
    "$PG_BIN/psql" -X -q -A -t -w -h "$HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres \
    -c 'select ssl from pg_stat_ssl where pid = pg_backend_pid()' 2>/dev/null)" == t ]]
}

# Copies of the server certificate and key in the data directory, owned by
# the cluster owner (PostgreSQL refuses a key that others can read).
pg_tls_files() {
  local own=()
  is_root && own=(-o postgres -g postgres)
  install -m 0644 "${own[@]}" "$TLS_SERVER_CRT" "$PG_DATA/dbps-server.crt"
  install -m 0600 "${own[@]}" "$TLS_SERVER_KEY" "$PG_DATA/dbps-server.key"
}

pg_write_conf() {
  pg_tls_files
  cat >"$PG_DATA/dbps.conf" <<EOF
# Written by scripts/stack.sh on every start; edit the script, not this file.
listen_addresses = '$HOST'
port = $PG_PORT
unix_socket_directories = '$PG_SOCK'
password_encryption = 'scram-sha-256'
wal_level = logical
track_commit_timestamp = on
max_connections = 300
max_replication_slots = 20
max_wal_senders = 20
shared_buffers = 256MB
max_wal_size = 2GB
logging_collector = off
log_line_prefix = '%m [%p] %q%u@%d '
# TLS on the same port, optional: plain connections work as before (pg_hba's
# host lines match both). Certificate from .dbps/tls (see tls_ensure);
# relative paths are relative to the data directory.
ssl = on
ssl_cert_file = 'dbps-server.crt'
ssl_key_file = 'dbps-server.key'
ssl_min_protocol_version = 'TLSv1.2'
EOF
  is_root && chown postgres:postgres "$PG_DATA/dbps.conf"
  return 0
}

pg_initdb() {
  local pwfile="$PG_REAL/.pwfile"
  info "postgres  initdb $(rel "$PG_DATA") ($("$PG_BIN/postgres" --version))"
  (umask 077 && printf '%s\n' "$PG_PASSWORD" >"$pwfile")
  is_root && chown postgres:postgres "$pwfile"
  if ! pg_as "$PG_BIN/initdb" -D "$PG_DATA" -U "$PG_USER" --pwfile="$pwfile" \
    --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --no-locale \
    >"$PG_REAL/initdb.log" 2>&1; then
    rm -f "$pwfile"
    fail_server postgres "$PG_REAL/initdb.log" "initdb failed"
  fi
  rm -f "$pwfile"
  printf "\n# dbps dev stack settings\ninclude_if_exists = 'dbps.conf'\n" >>"$PG_DATA/postgresql.conf"
}

pg_start() {
  tls_ensure
  pg_prepare_dirs
  if pg_pid >/dev/null; then
    PG_STARTED=0
    return 0
  fi
  if port_open "$PG_PORT"; then
    fail_server postgres "$PG_LOG" "port $HOST:$PG_PORT is already in use by a process not started by stack.sh"
  fi
  [[ -f "$PG_DATA/PG_VERSION" ]] || pg_initdb
  pg_write_conf
  rotate_log "$PG_LOG"
  is_root && chown postgres:postgres "$PG_LOG"
  # shellcheck disable=SC2016 # expanded by the inner bash
  if ! pg_as setsid bash -c "$CLOSE_FDS"'; exec "$@"' pg_ctl "$PG_BIN/pg_ctl" start -W -D "$PG_DATA" -l "$PG_LOG" >"$PG_REAL/pg_ctl.log" 2>&1 </dev/null 9>&-; then
    cat "$PG_REAL/pg_ctl.log" >>"$PG_LOG" 2>/dev/null || true
    fail_server postgres "$PG_LOG" "pg_ctl start failed"
  fi
  PG_STARTED=1
}

pg_wait() {
  local deadline=$((SECONDS + TIMEOUT)) start=$SECONDS
  until pg_probe; do
    if ((SECONDS >= deadline)); then
      fail_server postgres "$PG_LOG" "not ready after ${TIMEOUT}s (pg_isready/psql on $HOST:$PG_PORT)"
    fi
    if ((SECONDS - start > 3)) && ! pg_pid >/dev/null; then
      fail_server postgres "$PG_LOG" "the server exited during start-up"
    fi
    sleep 0.3
  done
  if ! pg_tls_probe; then
    sleep 1
    pg_tls_probe || fail_server postgres "$PG_LOG" "answers on $HOST:$PG_PORT, but not over TLS (sslmode=verify-full, CA $(rel "$TLS_CA_CRT")); a server started before TLS was set up, or with older TLS files, needs a restart: $(rel "$SCRIPT_DIR")/stack.sh stop postgres && $(rel "$SCRIPT_DIR")/stack.sh start postgres"
  fi
}

pg_stop() { # [fast|immediate] (pg_ctl's shutdown mode; default fast)
  local mode="${1:-fast}"
  pg_paths
  if ! pg_pid >/dev/null; then
    line postgres stopped "$HOST:$PG_PORT"
    return 0
  fi
  if pg_as "$PG_BIN/pg_ctl" stop -D "$PG_DATA" -m "$mode" -w -t 60 >/dev/null; then
    line postgres stopped "$HOST:$PG_PORT"
  else
    warn "pg_ctl stop failed, see $(rel "$PG_LOG")"
    return 1
  fi
}

# ---------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------

REDIS_PID="$REDIS_DIR/redis.pid"
REDIS_LOG="$REDIS_DIR/redis.log"

REDIS_ADDRESS="$HOST:$REDIS_PORT,$REDIS_TLS_PORT"

redis_pid() { live_pid "$REDIS_PID" redis-server; }

redis_probe() {
  [[ "$(timeout 3 redis-cli -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null)" == PONG ]]
}

# The TLS port (certificate checked against the stack's CA), logged in as the
# admin user: ACL WHOAMI, since after a failed AUTH redis-cli carries on as the
# 'default' user. The password goes through REDISCLI_AUTH, not the command line.
redis_tls_probe() {
  local pw
  pw="$(secret_read "$REDIS_ADMIN_PASSWORD_FILE")" || return 1
  [[ "$(REDISCLI_AUTH="$pw" timeout 3 redis-cli --tls --cacert "$TLS_CA_CRT" -h "$HOST" -p "$REDIS_TLS_PORT" \
    --user "$ADMIN_USER" --no-auth-warning acl whoami 2>/dev/null)" == "$ADMIN_USER" ]]
}

redis_start() {
  tls_ensure
  mkdir -p "$REDIS_DIR"
  if redis_pid >/dev/null; then
    REDIS_STARTED=0
    return 0
  fi
  if port_open "$REDIS_PORT" || port_open "$REDIS_TLS_PORT"; then
    fail_server redis "$REDIS_LOG" "port $HOST:$REDIS_PORT or $HOST:$REDIS_TLS_PORT is already in use by a process not started by stack.sh"
  fi
  local pw_hash
  pw_hash="$(secret_read "$REDIS_ADMIN_PASSWORD_FILE" | sha256sum | cut -d' ' -f1)"
  # The config names the admin user with the SHA-256 of its password (ACL
  # syntax #<hash>), not the password; still only for our eyes.
  rm -f "$REDIS_DIR/redis.conf"
  (umask 077 && : >"$REDIS_DIR/redis.conf")
  cat >"$REDIS_DIR/redis.conf" <<EOF
# Written by scripts/stack.sh on every start.
bind $HOST
port $REDIS_PORT
protected-mode yes
daemonize yes
pidfile $REDIS_PID
logfile $REDIS_LOG
dir $REDIS_DIR
save ""
appendonly no
databases 16
# TLS on a second port (same data); no client certificates. The plain port
# above stays as it was, its 'default' user without a password.
tls-port $REDIS_TLS_PORT
tls-cert-file $TLS_SERVER_CRT
tls-key-file $TLS_SERVER_KEY
tls-ca-cert-file $TLS_CA_CRT
tls-auth-clients no
tls-protocols "TLSv1.2 TLSv1.3"
# Admin user (password in $(rel "$REDIS_ADMIN_PASSWORD_FILE")).
user $ADMIN_USER on #$pw_hash ~* &* +@all
EOF
  rotate_log "$REDIS_LOG"
  rm -f "$REDIS_PID"
  if ! run_detached redis-server "$REDIS_DIR/redis.conf" >>"$REDIS_LOG" 2>&1 </dev/null 9>&-; then
    fail_server redis "$REDIS_LOG" "redis-server failed to start"
  fi
  REDIS_STARTED=1
}

redis_wait() {
  local deadline=$((SECONDS + TIMEOUT)) start=$SECONDS
  until redis_probe; do
    if ((SECONDS >= deadline)); then
      fail_server redis "$REDIS_LOG" "not ready after ${TIMEOUT}s (redis-cli -p $REDIS_PORT ping)"
    fi
    if ((SECONDS - start > 3)) && ! redis_pid >/dev/null; then
      fail_server redis "$REDIS_LOG" "the server exited during start-up"
    fi
    sleep 0.2
  done
  local tries=0
  until redis_tls_probe; do
    tries=$((tries + 1))
    # A server that was already running gets a few tries, not the whole deadline.
    if ((SECONDS >= deadline)) || { [[ "$REDIS_STARTED" -eq 0 ]] && ((tries >= 5)); }; then
      fail_server redis "$REDIS_LOG" "answers on $HOST:$REDIS_PORT, but not over TLS as $ADMIN_USER on $HOST:$REDIS_TLS_PORT (CA $(rel "$TLS_CA_CRT")); a server started before TLS was set up, or with older TLS files, needs a restart: $(rel "$SCRIPT_DIR")/stack.sh stop redis && $(rel "$SCRIPT_DIR")/stack.sh start redis"
    fi
    sleep 0.2
  done
}

redis_stop() {
  local pid
  if pid="$(redis_pid)"; then
    stop_pid "$pid" 30
  fi
  rm -f "$REDIS_PID"
  line redis stopped "$REDIS_ADDRESS"
}

# ---------------------------------------------------------------------------
# Kafka (KRaft, combined broker + controller, node.id=1)
# ---------------------------------------------------------------------------

KAFKA_PID="$KAFKA_DIR/kafka.pid"
KAFKA_LOG="$KAFKA_DIR/kafka.log"
JAVA=""

KAFKA_ADDRESS="$HOST:$KAFKA_PORT,$KAFKA_SECURE_PORT"
KAFKA_ADMIN_PROPS="$KAFKA_DIR/admin-client.properties" # client config for SECURE as dbps-admin

kafka_pid() { live_pid "$KAFKA_PID" kafka.Kafka; }

# `status` of a broker started with another DBPS_CACHE_DIR: use the jars it runs with.
kafka_use_running_libs() {
  local libs
  [[ -d "$KAFKA_LIBS" ]] && return 0
  libs="$(cat "$KAFKA_DIR/libs.path" 2>/dev/null || true)"
  if [[ -n "$libs" && -d "$libs" ]]; then KAFKA_LIBS="$libs"; fi
}

kafka_java() { # main-class args... (short-lived tool JVMs)
  "$JAVA" -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    -Dlog4j2.configurationFile="$SCRIPT_DIR/kafka/log4j2.properties" -Ddbps.kafka.loglevel=warn \
    -cp "$KAFKA_LIBS/*" "$@"
}

# Real client round trip: ApiVersions against the broker, broker unfenced.
kafka_probe() {
  port_open "$KAFKA_PORT" || return 1
  timeout 30 "$JAVA" -Xmx128m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    -Dlog4j2.configurationFile="$SCRIPT_DIR/kafka/log4j2.properties" -Ddbps.kafka.loglevel=error \
    -cp "$KAFKA_LIBS/*" org.apache.kafka.tools.BrokerApiVersionsCommand \
    --bootstrap-server "$HOST:$KAFKA_PORT" >"$KAFKA_DIR/probe.out" 2>&1 || return 1
  grep -q "^$HOST:$KAFKA_PORT (id: 1" "$KAFKA_DIR/probe.out" || return 1
  ! grep -q 'isFenced: true' "$KAFKA_DIR/probe.out"
}

# Client properties for the SECURE listener as the admin user (0600: it holds
# the password); also for users: kafka tools take it as --command-config.
kafka_write_admin_props() {
  local pw
  pw="$(secret_read "$KAFKA_ADMIN_PASSWORD_FILE")" || die "no Kafka admin password in $(rel "$KAFKA_ADMIN_PASSWORD_FILE")"
  rm -f "$KAFKA_ADMIN_PROPS.tmp"
  (umask 077 && : >"$KAFKA_ADMIN_PROPS.tmp")
  cat >"$KAFKA_ADMIN_PROPS.tmp" <<EOF
# Written by scripts/stack.sh: Kafka client settings for the dev stack's SECURE
# listener as $ADMIN_USER (a super user), e.g.
#   kafka-topics.sh --bootstrap-server $HOST:$KAFKA_SECURE_PORT --command-config $KAFKA_ADMIN_PROPS --list
bootstrap.servers=$HOST:$KAFKA_SECURE_PORT
security.protocol=SASL_SSL
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="$ADMIN_USER" password="$pw";
ssl.truststore.type=PEM
ssl.truststore.location=$TLS_CA_CRT
EOF
  chmod 600 "$KAFKA_ADMIN_PROPS.tmp"
  mv -f "$KAFKA_ADMIN_PROPS.tmp" "$KAFKA_ADMIN_PROPS"
}

# ApiVersions over SASL_SSL as the admin user: TLS (certificate checked against
# the stack's CA, host name included) and SCRAM-SHA-512 login both work.
kafka_secure_probe() {
  port_open "$KAFKA_SECURE_PORT" || return 1
  timeout 30 "$JAVA" -Xmx128m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    -Dlog4j2.configurationFile="$SCRIPT_DIR/kafka/log4j2.properties" -Ddbps.kafka.loglevel=error \
    -cp "$KAFKA_LIBS/*" org.apache.kafka.tools.BrokerApiVersionsCommand \
    --bootstrap-server "$HOST:$KAFKA_SECURE_PORT" --command-config "$KAFKA_ADMIN_PROPS" \
    >"$KAFKA_DIR/secure-probe.out" 2>&1 || return 1
  grep -q "^$HOST:$KAFKA_SECURE_PORT (id: 1" "$KAFKA_DIR/secure-probe.out"
}

# The SECURE listener answers the admin user. Its SCRAM-SHA-512 credential is
# kept in the cluster metadata (it survives restarts): if the first probe fails
# (new data dir, new password), it is upserted through the plaintext listener
# and the probe retried. ConfigCommand reads the password from a short-lived
# 0600 file (--add-config-file), not from its command line; in that file the
# value goes without the brackets that --add-config wants.
kafka_secure_setup() {
  local pw log="$KAFKA_DIR/admin.log" tries
  if ! port_open "$KAFKA_SECURE_PORT"; then
    fail_server kafka "$KAFKA_LOG" "nothing listens on the SECURE listener $HOST:$KAFKA_SECURE_PORT; a broker started before it was configured needs a restart: $(rel "$SCRIPT_DIR")/stack.sh stop kafka && $(rel "$SCRIPT_DIR")/stack.sh start kafka"
  fi
  kafka_write_admin_props
  kafka_secure_probe && return 0
  pw="$(secret_read "$KAFKA_ADMIN_PASSWORD_FILE")"
  rm -f "$KAFKA_DIR/admin-scram.properties"
  (umask 077 && printf 'SCRAM-SHA-512=iterations=8192,password=%s\n' "$pw" >"$KAFKA_DIR/admin-scram.properties")
  if ! timeout 60 "$JAVA" -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    -Dlog4j2.configurationFile="$SCRIPT_DIR/kafka/log4j2.properties" -Ddbps.kafka.loglevel=warn \
    -cp "$KAFKA_LIBS/*" org.apache.kafka.tools.ConfigCommand --bootstrap-server "$HOST:$KAFKA_PORT" \
    --alter --add-config-file "$KAFKA_DIR/admin-scram.properties" \
    --entity-type users --entity-name "$ADMIN_USER" >"$log" 2>&1; then
    rm -f "$KAFKA_DIR/admin-scram.properties"
    sed -i "s/$pw/***/g" "$log" # error messages may quote the config
    fail_server kafka "$log" "could not set the SCRAM-SHA-512 credential of $ADMIN_USER (kafka-configs --alter --entity-type users)"
  fi
  rm -f "$KAFKA_DIR/admin-scram.properties"
  # The new credential reaches the broker's cache through the metadata log:
  # give it a moment.
  for ((tries = 1; ; tries++)); do
    kafka_secure_probe && return 0
    if ((tries >= 20)); then
      cat "$KAFKA_DIR/secure-probe.out" >>"$KAFKA_LOG" 2>/dev/null || true
      fail_server kafka "$KAFKA_LOG" "no answer on the SECURE listener $HOST:$KAFKA_SECURE_PORT (SASL_SSL, SCRAM-SHA-512 as $ADMIN_USER, $(rel "$KAFKA_ADMIN_PROPS"); probe output appended to the log; a broker started with older TLS files needs a restart: $(rel "$SCRIPT_DIR")/stack.sh stop kafka && $(rel "$SCRIPT_DIR")/stack.sh start kafka)"
    fi
    sleep 1
  done
}

kafka_write_config() {
  cat >"$KAFKA_DIR/server.properties" <<EOF
# Written by scripts/stack.sh on every start; edit the script, not this file.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://$HOST:$KAFKA_PORT,CONTROLLER://$HOST:$KAFKA_CONTROLLER_PORT,PROXIED://$HOST:$KAFKA_PROXIED_PORT,SECURE://$HOST:$KAFKA_SECURE_PORT
advertised.listeners=PLAINTEXT://$HOST:$KAFKA_PORT,PROXIED://$HOST:$KAFKA_PROXIED_ADVERTISED_PORT,SECURE://$HOST:$KAFKA_SECURE_PORT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,PROXIED:PLAINTEXT,SECURE:SASL_SSL
# SECURE: what production looks like — TLS (server certificate from .dbps/tls,
# a PEM keystore) and SCRAM-SHA-512 logins (credentials in the cluster
# metadata; the admin's is set by stack.sh after each start).
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.secure.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.secure.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.secure.ssl.keystore.type=PEM
listener.name.secure.ssl.keystore.location=$TLS_KAFKA_PEM
listener.name.secure.ssl.client.auth=none
listener.name.secure.ssl.enabled.protocols=TLSv1.3,TLSv1.2
# ACLs are enforced: a principal with no ACL may do nothing. Super users:
# $ADMIN_USER (SECURE) and ANONYMOUS, the principal of every PLAINTEXT-protocol
# listener (PLAINTEXT, PROXIED, CONTROLLER), so those keep full access. That is
# a dev convenience of this stack only: production has no plaintext listener.
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
super.users=User:ANONYMOUS;User:$ADMIN_USER
log.dirs=$KAFKA_DIR/data
num.partitions=1
default.replication.factor=1
auto.create.topics.enable=false
delete.topic.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=10
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.retention.hours=24
log.segment.bytes=268435456
EOF
}

kafka_format() {
  local cid
  if [[ ! -s "$KAFKA_DIR/cluster.id" ]]; then
    cid="$(kafka_java kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1)"
    [[ -n "$cid" ]] || fail_server kafka "$KAFKA_DIR/format.log" "kafka-storage random-uuid failed"
    printf '%s\n' "$cid" >"$KAFKA_DIR/cluster.id"
  fi
  cid="$(cat "$KAFKA_DIR/cluster.id")"
  info "kafka     formatting $(rel "$KAFKA_DIR/data") (cluster id $cid)"
  if ! kafka_java kafka.tools.StorageTool format --config "$KAFKA_DIR/server.properties" \
    --cluster-id "$cid" --ignore-formatted >"$KAFKA_DIR/format.log" 2>&1; then
    fail_server kafka "$KAFKA_DIR/format.log" "kafka-storage format failed"
  fi
}

kafka_start() {
  tls_ensure
  mkdir -p "$KAFKA_DIR/data"
  if kafka_pid >/dev/null; then
    KAFKA_STARTED=0
    return 0
  fi
  if port_open "$KAFKA_PORT" || port_open "$KAFKA_CONTROLLER_PORT" || port_open "$KAFKA_PROXIED_PORT" ||
    port_open "$KAFKA_SECURE_PORT"; then
    fail_server kafka "$KAFKA_LOG" "port $HOST:$KAFKA_PORT, $HOST:$KAFKA_CONTROLLER_PORT, $HOST:$KAFKA_PROXIED_PORT or $HOST:$KAFKA_SECURE_PORT is already in use by a process not started by stack.sh"
  fi
  kafka_write_config
  printf '%s\n' "$KAFKA_LIBS" >"$KAFKA_DIR/libs.path"
  [[ -f "$KAFKA_DIR/data/meta.properties" ]] || kafka_format
  rotate_log "$KAFKA_LOG"
  # shellcheck disable=SC2086 # KAFKA_HEAP_OPTS is a list of JVM options
  if ! spawn "$KAFKA_PID" "$KAFKA_LOG" "$JAVA" $KAFKA_HEAP_OPTS \
    -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExitOnOutOfMemoryError \
    -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$SCRIPT_DIR/kafka/log4j2.properties" \
    -cp "$KAFKA_LIBS/*" kafka.Kafka "$KAFKA_DIR/server.properties"; then
    fail_server kafka "$KAFKA_LOG" "could not launch the JVM ($JAVA)"
  fi
  KAFKA_STARTED=1
}

kafka_wait() {
  local deadline=$((SECONDS + TIMEOUT))
  while :; do
    if ! kafka_pid >/dev/null; then
      fail_server kafka "$KAFKA_LOG" "the broker exited during start-up"
    fi
    if { [[ "$KAFKA_STARTED" -eq 0 ]] || grep -q 'Kafka Server started' "$KAFKA_LOG"; } && kafka_probe; then
      kafka_secure_setup
      return 0
    fi
    if ((SECONDS >= deadline)); then
      fail_server kafka "$KAFKA_LOG" "not ready after ${TIMEOUT}s (ApiVersions on $HOST:$KAFKA_PORT)"
    fi
    sleep 0.5
  done
}

kafka_stop() {
  local pid
  if pid="$(kafka_pid)"; then
    stop_pid "$pid" 60
  fi
  rm -f "$KAFKA_PID"
  line kafka stopped "$KAFKA_ADDRESS"
}

# ---------------------------------------------------------------------------
# FerretDB 1.x (PostgreSQL backend: its documents live in the stack's own PostgreSQL,
# database "ferretdb", so FerretDB needs PostgreSQL up to start and to answer)
# ---------------------------------------------------------------------------

FERRET_DATABASE=ferretdb

FERRET_PID="$FERRET_DIR/ferretdb.pid"
FERRET_LOG="$FERRET_DIR/ferretdb.log"

ferret_pid() { live_pid "$FERRET_PID" ferretdb; }

# MongoDB wire protocol round trip in pure bash: OP_MSG {ping: 1, $db: "admin"},
# expect an OP_MSG reply containing ok: 1.0 (double) or ok: 1 (int32).
ferret_probe() (
  exec 3<>"/dev/tcp/$HOST/$FERRET_PORT" || exit 1
  # header: length 51, requestID 1, responseTo 0, opCode 2013 (OP_MSG);
  # flagBits 0; section kind 0; BSON {ping: int32 1, $db: "admin"} (30 bytes)
  # shellcheck disable=SC2016 # "$db" is the literal BSON key
  printf '\x33\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\xdd\x07\x00\x00''\x00\x00\x00\x00''\x00''\x1e\x00\x00\x00\x10ping\x00\x01\x00\x00\x00\x02$db\x00\x06\x00\x00\x00admin\x00\x00' >&3 || exit 1
  hex="$(timeout 5 dd bs=1 count=4 status=none <&3 | od -An -v -tx1 | tr -d ' \n')"
  [[ ${#hex} -eq 8 ]] || exit 1
  len=$((16#${hex:6:2}${hex:4:2}${hex:2:2}${hex:0:2}))
  ((len >= 21 && len <= 65536)) || exit 1
  hex+="$(timeout 5 dd bs=1 count=$((len - 4)) status=none <&3 | od -An -v -tx1 | tr -d ' \n')"
  [[ "${hex:24:8}" == dd070000 ]] || exit 1
  [[ "$hex" == *016f6b00000000000000f03f* || "$hex" == *106f6b0001000000* ]]
)

# Creates FerretDB's database in the stack's PostgreSQL unless it exists.
ferret_database() {
  local psql=(env PGPASSWORD="$PG_PASSWORD" PGCONNECT_TIMEOUT=3 "$PG_BIN/psql" -X -q -A -t -w
    -h "$HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres)
  [[ "$("${psql[@]}" -c "select 1 from pg_database where datname = '$FERRET_DATABASE'" 2>/dev/null)" == 1 ]] ||
    "${psql[@]}" -c "create database $FERRET_DATABASE" >>"$FERRET_LOG" 2>&1 ||
    fail_server ferretdb "$FERRET_LOG" "could not create database $FERRET_DATABASE in PostgreSQL ($HOST:$PG_PORT)"
}

# Needs PostgreSQL ready (pg_wait).
ferret_start() {
  mkdir -p "$FERRET_DIR/state"
  if ferret_pid >/dev/null; then
    FERRET_STARTED=0
    return 0
  fi
  if port_open "$FERRET_PORT"; then
    fail_server ferretdb "$FERRET_LOG" "port $HOST:$FERRET_PORT is already in use by a process not started by stack.sh"
  fi
  rotate_log "$FERRET_LOG"
  ferret_database
  if ! spawn "$FERRET_PID" "$FERRET_LOG" "$FERRET_BIN" \
    --handler=postgresql \
    --postgresql-url="postgres://$PG_USER:$PG_PASSWORD@$HOST:$PG_PORT/$FERRET_DATABASE" \
    --listen-addr="$HOST:$FERRET_PORT" \
    --debug-addr="$HOST:$FERRET_DEBUG_PORT" \
    --state-dir="$FERRET_DIR/state" \
    --telemetry=disable \
    --log-level=info \
    --log-format=text; then
    fail_server ferretdb "$FERRET_LOG" "could not launch $FERRET_BIN"
  fi
  FERRET_STARTED=1
}

ferret_wait() {
  local deadline=$((SECONDS + TIMEOUT))
  until ferret_probe 2>/dev/null; do
    if ! ferret_pid >/dev/null; then
      fail_server ferretdb "$FERRET_LOG" "the server exited during start-up"
    fi
    if ((SECONDS >= deadline)); then
      fail_server ferretdb "$FERRET_LOG" "not ready after ${TIMEOUT}s (OP_MSG ping on $HOST:$FERRET_PORT)"
    fi
    sleep 0.2
  done
}

ferret_stop() {
  local pid
  if pid="$(ferret_pid)"; then
    stop_pid "$pid" 30
  fi
  rm -f "$FERRET_PID"
  line ferretdb stopped "$HOST:$FERRET_PORT"
}

# ---------------------------------------------------------------------------
# Mailpit (SMTP server with an HTTP API; messages in an SQLite file)
# ---------------------------------------------------------------------------

MAILPIT_PID="$MAILPIT_DIR/mailpit.pid"
MAILPIT_LOG="$MAILPIT_DIR/mailpit.log"
MAILPIT_ADDRESS="$HOST:$MAILPIT_SMTP_PORT,$MAILPIT_HTTP_PORT"
MAILPIT_MAX_MESSAGES=2000 # the oldest are deleted beyond this
MAILPIT_MAX_SIZE_MB=50    # the email service sends attachments

mailpit_pid() { live_pid "$MAILPIT_PID" mailpit; }

# The HTTP API answers: GET /api/v1/info is 200 with Mailpit's JSON (pure bash,
# HTTP/1.0 so that the server closes the connection after the reply).
mailpit_http_probe() (
  exec 3<>"/dev/tcp/$HOST/$MAILPIT_HTTP_PORT" || exit 1
  printf 'GET /api/v1/info HTTP/1.0\r\nHost: %s:%s\r\nAccept: application/json\r\n\r\n' \
    "$HOST" "$MAILPIT_HTTP_PORT" >&3 || exit 1
  reply="$(timeout 5 cat <&3)" || exit 1
  [[ "$reply" == "HTTP/1."?" 200 "* && "$reply" == *'"Version"'* ]]
)

# The SMTP server greets with 220 (then we say QUIT).
mailpit_smtp_probe() (
  exec 3<>"/dev/tcp/$HOST/$MAILPIT_SMTP_PORT" || exit 1
  IFS= read -r -t 5 greeting <&3 || exit 1
  printf 'QUIT\r\n' >&3 2>/dev/null || true
  [[ "$greeting" == 220[\ -]* ]]
)

mailpit_probe() { mailpit_http_probe 2>/dev/null && mailpit_smtp_probe 2>/dev/null; }

mailpit_start() {
  mkdir -p "$MAILPIT_DIR"
  if mailpit_pid >/dev/null; then
    MAILPIT_STARTED=0
    return 0
  fi
  if port_open "$MAILPIT_SMTP_PORT" || port_open "$MAILPIT_HTTP_PORT"; then
    fail_server mailpit "$MAILPIT_LOG" "port $HOST:$MAILPIT_SMTP_PORT or $HOST:$MAILPIT_HTTP_PORT is already in use by a process not started by stack.sh"
  fi
  rotate_log "$MAILPIT_LOG"
  # Any sender and recipient, no authentication needed (a client that logs in
  # anyway is accepted with any credentials, also without TLS); no reverse DNS
  # of clients and no check for new releases (neither has a network here).
  if ! spawn "$MAILPIT_PID" "$MAILPIT_LOG" "$MAILPIT_BIN" \
    --smtp "$HOST:$MAILPIT_SMTP_PORT" \
    --listen "$HOST:$MAILPIT_HTTP_PORT" \
    --database "$MAILPIT_DIR/mailpit.db" \
    --max "$MAILPIT_MAX_MESSAGES" \
    --max-message-size "$MAILPIT_MAX_SIZE_MB" \
    --smtp-auth-accept-any \
    --smtp-auth-allow-insecure \
    --smtp-disable-rdns \
    --disable-version-check; then
    fail_server mailpit "$MAILPIT_LOG" "could not launch $MAILPIT_BIN"
  fi
  MAILPIT_STARTED=1
}

mailpit_wait() {
  local deadline=$((SECONDS + TIMEOUT))
  until mailpit_probe; do
    if ! mailpit_pid >/dev/null; then
      fail_server mailpit "$MAILPIT_LOG" "the server exited during start-up"
    fi
    if ((SECONDS >= deadline)); then
      fail_server mailpit "$MAILPIT_LOG" "not ready after ${TIMEOUT}s (GET /api/v1/info on $HOST:$MAILPIT_HTTP_PORT, SMTP 220 on $HOST:$MAILPIT_SMTP_PORT)"
    fi
    sleep 0.2
  done
}

mailpit_stop() {
  local pid
  if pid="$(mailpit_pid)"; then
    stop_pid "$pid" 30
  fi
  rm -f "$MAILPIT_PID"
  line mailpit stopped "$MAILPIT_ADDRESS"
}

# ---------------------------------------------------------------------------
# OpenSearch (single node, no security plugin; see scripts/opensearch/)
# ---------------------------------------------------------------------------

OPENSEARCH_PID="$OPENSEARCH_DIR/opensearch.pid"
OPENSEARCH_LOG="$OPENSEARCH_DIR/opensearch.log"
OPENSEARCH_ADDRESS="$HOST:$OPENSEARCH_PORT"

opensearch_pid() { live_pid "$OPENSEARCH_PID" DbpsOpenSearch; }

# One HTTP/1.0 request (pure bash, the server closes the connection after the
# reply); prints the whole reply, status line first.
opensearch_http() ( # method path [json-body]
  local body="${3:-}"
  exec 3<>"/dev/tcp/$HOST/$OPENSEARCH_PORT" || exit 1
  printf '%s %s HTTP/1.0\r\nHost: %s:%s\r\nAccept: application/json\r\nContent-Type: application/json\r\nContent-Length: %s\r\n\r\n%s' \
    "$1" "$2" "$HOST" "$OPENSEARCH_PORT" "${#body}" "$body" >&3 || exit 1
  timeout 10 cat <&3
)

# The cluster is green (a single node: every shard assigned).
opensearch_probe() {
  local reply
  reply="$(opensearch_http GET '/_cluster/health?wait_for_status=green&timeout=1s' 2>/dev/null)" || return 1
  [[ "$reply" == "HTTP/1."?" 200 "* && "$reply" == *'"status":"green"'* ]]
}

# New indices without replicas (there is no second node to hold them; with the
# default of one replica every index would stay yellow). As a node setting this
# has no effect, so it goes through the cluster settings API, persistently.
opensearch_no_replicas() {
  local reply
  reply="$(opensearch_http PUT /_cluster/settings \
    '{"persistent":{"cluster.default_number_of_replicas":0}}' 2>/dev/null)" || return 1
  [[ "$reply" == "HTTP/1."?" 200 "* && "$reply" == *'"acknowledged":true'* ]]
}

opensearch_start() {
  mkdir -p "$OPENSEARCH_DIR/tmp"
  if opensearch_pid >/dev/null; then
    OPENSEARCH_STARTED=0
    return 0
  fi
  if port_open "$OPENSEARCH_PORT" || port_open "$OPENSEARCH_TRANSPORT_PORT"; then
    fail_server opensearch "$OPENSEARCH_LOG" "port $HOST:$OPENSEARCH_PORT or $HOST:$OPENSEARCH_TRANSPORT_PORT is already in use by a process not started by stack.sh"
  fi
  rotate_log "$OPENSEARCH_LOG"
  # shellcheck disable=SC2086 # OPENSEARCH_HEAP_OPTS is a list of JVM options
  if ! spawn "$OPENSEARCH_PID" "$OPENSEARCH_LOG" "$JAVA" $OPENSEARCH_HEAP_OPTS \
    -XX:+UseSerialGC -XX:+ExitOnOutOfMemoryError \
    -Djava.awt.headless=true -Dfile.encoding=UTF-8 \
    -Djava.io.tmpdir="$OPENSEARCH_DIR/tmp" \
    -Dlog4j2.configurationFile="$SCRIPT_DIR/opensearch/log4j2.properties" \
    -cp "$OPENSEARCH_LIBS/*:$OPENSEARCH_CLASSES" DbpsOpenSearch "$OPENSEARCH_DIR" \
    "network.host=$HOST" "http.port=$OPENSEARCH_PORT" "transport.port=$OPENSEARCH_TRANSPORT_PORT"; then
    fail_server opensearch "$OPENSEARCH_LOG" "could not launch the JVM ($JAVA)"
  fi
  OPENSEARCH_STARTED=1
}

opensearch_wait() {
  local deadline=$((SECONDS + TIMEOUT)) configured=0
  while :; do
    if ! opensearch_pid >/dev/null; then
      fail_server opensearch "$OPENSEARCH_LOG" "the node exited during start-up"
    fi
    if ((configured)) || opensearch_no_replicas; then
      configured=1
      opensearch_probe && return 0
    fi
    if ((SECONDS >= deadline)); then
      fail_server opensearch "$OPENSEARCH_LOG" "not ready after ${TIMEOUT}s (cluster settings, then GET /_cluster/health green on $OPENSEARCH_ADDRESS)"
    fi
    sleep 0.5
  done
}

opensearch_stop() {
  local pid
  if pid="$(opensearch_pid)"; then
    stop_pid "$pid" 30
  fi
  rm -f "$OPENSEARCH_PID"
  line opensearch stopped "$OPENSEARCH_ADDRESS"
}

# ---------------------------------------------------------------------------
# Toxiproxy (TCP fault proxy; on demand only, not part of `up`; the chaos
# harness creates its proxies through the HTTP API)
# ---------------------------------------------------------------------------

TOXIPROXY_PID="$TOXIPROXY_DIR/toxiproxy.pid"
TOXIPROXY_LOG="$TOXIPROXY_DIR/toxiproxy.log"

toxiproxy_pid() { live_pid "$TOXIPROXY_PID" toxiproxy-server; }

# The HTTP API answers: GET /version is 200 with {"version": ...} (pure bash,
# HTTP/1.0 so that the server closes the connection after the reply).
toxiproxy_probe() (
  exec 3<>"/dev/tcp/$HOST/$TOXIPROXY_PORT" 2>/dev/null || exit 1
  printf 'GET /version HTTP/1.0\r\nHost: %s:%s\r\nAccept: application/json\r\n\r\n' \
    "$HOST" "$TOXIPROXY_PORT" >&3 || exit 1
  reply="$(timeout 5 cat <&3)" || exit 1
  [[ "$reply" == "HTTP/1."?" 200 "* && "$reply" == *'"version"'* ]]
)

toxiproxy_start() {
  mkdir -p "$TOXIPROXY_DIR"
  if toxiproxy_pid >/dev/null; then
    TOXIPROXY_STARTED=0
    return 0
  fi
  if port_open "$TOXIPROXY_PORT"; then
    fail_server toxiproxy "$TOXIPROXY_LOG" "port $HOST:$TOXIPROXY_PORT is already in use by a process not started by stack.sh"
  fi
  rotate_log "$TOXIPROXY_LOG"
  # Starts with no proxies (no -config): they are created through the API.
  if ! spawn "$TOXIPROXY_PID" "$TOXIPROXY_LOG" "$TOXIPROXY_BIN" \
    -host "$HOST" \
    -port "$TOXIPROXY_PORT"; then
    fail_server toxiproxy "$TOXIPROXY_LOG" "could not launch $TOXIPROXY_BIN"
  fi
  TOXIPROXY_STARTED=1
}

toxiproxy_wait() {
  local deadline=$((SECONDS + TIMEOUT))
  until toxiproxy_probe; do
    if ! toxiproxy_pid >/dev/null; then
      fail_server toxiproxy "$TOXIPROXY_LOG" "the server exited during start-up"
    fi
    if ((SECONDS >= deadline)); then
      fail_server toxiproxy "$TOXIPROXY_LOG" "not ready after ${TIMEOUT}s (GET /version on $HOST:$TOXIPROXY_PORT)"
    fi
    sleep 0.2
  done
}

toxiproxy_stop() {
  local pid
  if pid="$(toxiproxy_pid)"; then
    stop_pid "$pid" 30
  fi
  rm -f "$TOXIPROXY_PID"
  line toxiproxy stopped "$HOST:$TOXIPROXY_PORT"
}

# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------

# Serialise concurrent up/down runs. Every server is started with fd 9 closed
# so that it does not inherit (and keep holding) this lock.
lock() {
  mkdir -p "$DBPS_DIR"
  exec 9>"$DBPS_DIR/stack.lock"
  flock -w 900 9 || die "another scripts/stack.sh is still running (lock: $(rel "$DBPS_DIR/stack.lock"))"
}

ready_word() { if [[ "$1" -eq 1 ]]; then printf 'ready'; else printf 'running'; fi; }

cmd_up() {
  local t0=$SECONDS
  lock
  ensure_packages
  start_ferretdb_build
  start_mailpit_build
  ensure_kafka_libs
  ensure_opensearch_libs
  finish_ferretdb_build
  finish_mailpit_build

  pg_start
  redis_start
  kafka_start
  mailpit_start
  opensearch_start

  pg_wait
  line postgres "$(ready_word "$PG_STARTED")" "$HOST:$PG_PORT" "$PG_LOG"
  ferret_start
  redis_wait
  line redis "$(ready_word "$REDIS_STARTED")" "$REDIS_ADDRESS" "$REDIS_LOG"
  ferret_wait
  line ferretdb "$(ready_word "$FERRET_STARTED")" "$HOST:$FERRET_PORT" "$FERRET_LOG"
  mailpit_wait
  line mailpit "$(ready_word "$MAILPIT_STARTED")" "$MAILPIT_ADDRESS" "$MAILPIT_LOG"
  kafka_wait
  line kafka "$(ready_word "$KAFKA_STARTED")" "$KAFKA_ADDRESS" "$KAFKA_LOG"
  opensearch_wait
  line opensearch "$(ready_word "$OPENSEARCH_STARTED")" "$OPENSEARCH_ADDRESS" "$OPENSEARCH_LOG"

  info "stack up in $((SECONDS - t0))s — eval \"\$($(rel "$SCRIPT_DIR")/stack.sh env)\" to use it"
}

cmd_down() {
  lock
  PG_BIN="$(find_pg_bin)" || true
  # On demand (not started by `up`): stopped too, but only mentioned if it ran.
  if toxiproxy_pid >/dev/null; then toxiproxy_stop; fi
  opensearch_stop
  mailpit_stop
  ferret_stop
  kafka_stop
  redis_stop
  if [[ -n "$PG_BIN" ]]; then
    pg_stop
  else
    line postgres stopped "$HOST:$PG_PORT"
  fi
}

cmd_status() {
  local down=0 state
  PG_BIN="$(find_pg_bin)" || true
  JAVA="$(find_java)" || true

  state=stopped
  if [[ -n "$PG_BIN" ]] && pg_pid >/dev/null; then
    if pg_probe; then state=running; else state=unhealthy; fi
  fi
  [[ "$state" == running ]] || down=1
  line postgres "$state" "$HOST:$PG_PORT" "$PG_LOG"

  state=stopped
  if redis_pid >/dev/null; then
    if command -v redis-cli >/dev/null 2>&1 && redis_probe; then state=running; else state=unhealthy; fi
  fi
  [[ "$state" == running ]] || down=1
  line redis "$state" "$REDIS_ADDRESS" "$REDIS_LOG"

  state=stopped
  kafka_use_running_libs
  if kafka_pid >/dev/null; then
    if [[ -n "$JAVA" ]] && kafka_probe; then state=running; else state=unhealthy; fi
  fi
  [[ "$state" == running ]] || down=1
  line kafka "$state" "$KAFKA_ADDRESS" "$KAFKA_LOG"

  state=stopped
  if ferret_pid >/dev/null; then
    if ferret_probe 2>/dev/null; then state=running; else state=unhealthy; fi
  fi
  [[ "$state" == running ]] || down=1
  line ferretdb "$state" "$HOST:$FERRET_PORT" "$FERRET_LOG"

  state=stopped
  if mailpit_pid >/dev/null; then
    if mailpit_probe; then state=running; else state=unhealthy; fi
  fi
  [[ "$state" == running ]] || down=1
  line mailpit "$state" "$MAILPIT_ADDRESS" "$MAILPIT_LOG"

  state=stopped
  if opensearch_pid >/dev/null; then
    if opensearch_probe; then state=running; else state=unhealthy; fi
  fi
  [[ "$state" == running ]] || down=1
  line opensearch "$state" "$OPENSEARCH_ADDRESS" "$OPENSEARCH_LOG"

  # On demand: listed only while it runs; not running does not count as down.
  if toxiproxy_pid >/dev/null; then
    if toxiproxy_probe; then state=running; else state=unhealthy; fi
    [[ "$state" == running ]] || down=1
    line toxiproxy "$state" "$HOST:$TOXIPROXY_PORT" "$TOXIPROXY_LOG"
  fi

  if ((down)); then return 3; fi
  return 0
}

# `export NAME=value`, the value single-quoted unless it is plainly safe, so
# that the output can be eval'ed (a URL's & must not reach the shell bare).
export_line() { # name value
  local v="$2" q="'\\''"
  if [[ "$v" =~ ^[A-Za-z0-9_.,:/@%+=-]*$ ]]; then
    printf 'export %s=%s\n' "$1" "$v"
  else
    printf "export %s='%s'\n" "$1" "${v//\'/$q}"
  fi
}

# Percent-encode a value for a URL query (RFC 3986 unreserved and / stay).
url_encode() {
  local s="$1" out="" c i
  for ((i = 0; i < ${#s}; i++)); do
    c="${s:i:1}"
    case "$c" in
      [A-Za-z0-9._~/-]) out+="$c" ;;
      *) out+="$(printf '%%%02X' "'$c")" ;;
    esac
  done
  printf '%s' "$out"
}

cmd_env() { # [--secure]
  local secure=0 pg_tls_url kafka_pw="" redis_pw=""
  case "${1:-}" in
    "") ;;
    --secure) secure=1 ;;
    *)
      usage >&2
      exit 2
      ;;
  esac
  pg_tls_url="postgres://$PG_USER:$PG_PASSWORD@$HOST:$PG_PORT/postgres?sslmode=verify-full&sslrootcert=$(url_encode "$TLS_CA_CRT")"
  kafka_pw="$(secret_read "$KAFKA_ADMIN_PASSWORD_FILE" 2>/dev/null)" || kafka_pw=""
  redis_pw="$(secret_read "$REDIS_ADMIN_PASSWORD_FILE" 2>/dev/null)" || redis_pw=""

  if ((secure)); then
    # The secured endpoints under the usual names, for an application.
    [[ -n "$kafka_pw" && -n "$redis_pw" ]] ||
      die "no admin passwords in $(rel "$TLS_DIR") yet: run '$(rel "$SCRIPT_DIR")/stack.sh up' first"
    export_line DBPS_POSTGRES_URL "$pg_tls_url"
    export_line DBPS_REDIS_URL "rediss://$ADMIN_USER:$redis_pw@$HOST:$REDIS_TLS_PORT"
    export_line DBPS_KAFKA_BROKERS "$HOST:$KAFKA_SECURE_PORT"
    export_line DBPS_KAFKA_SECURITY_PROTOCOL SASL_SSL
    export_line DBPS_KAFKA_SASL_MECHANISM SCRAM-SHA-512
    export_line DBPS_KAFKA_SASL_USERNAME "$ADMIN_USER"
    export_line DBPS_KAFKA_SASL_PASSWORD "$kafka_pw"
    export_line DBPS_KAFKA_SSL_CA_LOCATION "$TLS_CA_CRT"
  else
    # The plain endpoint stays plain: the server offers TLS, and a client's default
    # (sslmode=prefer) would take it, which costs the relay half its drain rate here
    # (docs/security.md). The secured view asks for it explicitly.
    printf "export DBPS_POSTGRES_URL='postgres://%s:%s@%s:%s/postgres?sslmode=disable'\n" "$PG_USER" "$PG_PASSWORD" "$HOST" "$PG_PORT"
    printf 'export DBPS_REDIS_URL=redis://%s:%s\n' "$HOST" "$REDIS_PORT"
    printf 'export DBPS_KAFKA_BROKERS=%s:%s\n' "$HOST" "$KAFKA_PORT"
  fi
  printf 'export DBPS_KAFKA_PROXIED_UPSTREAM=%s:%s\n' "$HOST" "$KAFKA_PROXIED_PORT"
  printf 'export DBPS_KAFKA_PROXIED_PORT=%s\n' "$KAFKA_PROXIED_ADVERTISED_PORT"
  printf 'export DBPS_MONGODB_URI=mongodb://%s:%s/\n' "$HOST" "$FERRET_PORT"
  printf 'export DBPS_SMTP_URL=smtp://%s:%s\n' "$HOST" "$MAILPIT_SMTP_PORT"
  printf 'export DBPS_MAILPIT_URL=http://%s:%s\n' "$HOST" "$MAILPIT_HTTP_PORT"
  printf 'export DBPS_OPENSEARCH_URL=http://%s:%s\n' "$HOST" "$OPENSEARCH_PORT"
  printf 'export DBPS_TOXIPROXY_URL=http://%s:%s\n' "$HOST" "$TOXIPROXY_PORT"

  export_line DBPS_TLS_CA_FILE "$TLS_CA_CRT"
  ((secure)) && return 0
  # The secured endpoints, next to the plain ones (secrets only once made).
  export_line DBPS_POSTGRES_TLS_URL "$pg_tls_url"
  export_line DBPS_KAFKA_SECURE_BROKERS "$HOST:$KAFKA_SECURE_PORT"
  export_line DBPS_KAFKA_ADMIN_USER "$ADMIN_USER"
  [[ -n "$kafka_pw" ]] && export_line DBPS_KAFKA_ADMIN_PASSWORD "$kafka_pw"
  export_line DBPS_REDIS_TLS_URL "rediss://$HOST:$REDIS_TLS_PORT"
  export_line DBPS_REDIS_ADMIN_USER "$ADMIN_USER"
  [[ -n "$redis_pw" ]] && export_line DBPS_REDIS_ADMIN_PASSWORD "$redis_pw"
  return 0
}

# Start one server that `up` installed before, and wait until it is ready.
cmd_start_one() { # server
  lock
  case "$1" in
    postgres)
      PG_BIN="$(find_pg_bin)" || die "no PostgreSQL server found; run '$(rel "$SCRIPT_DIR")/stack.sh up' first"
      pg_start
      pg_wait
      line postgres "$(ready_word "$PG_STARTED")" "$HOST:$PG_PORT" "$PG_LOG"
      ;;
    redis)
      command -v redis-server >/dev/null 2>&1 || die "redis-server not found; run '$(rel "$SCRIPT_DIR")/stack.sh up' first"
      redis_start
      redis_wait
      line redis "$(ready_word "$REDIS_STARTED")" "$REDIS_ADDRESS" "$REDIS_LOG"
      ;;
    kafka)
      JAVA="$(find_java)" || die "no java >= 17 found (Kafka 4 needs it); set DBPS_JAVA=/path/to/java"
      ensure_kafka_libs
      kafka_start
      kafka_wait
      line kafka "$(ready_word "$KAFKA_STARTED")" "$KAFKA_ADDRESS" "$KAFKA_LOG"
      ;;
    ferretdb)
      [[ -x "$FERRET_BIN" ]] || die "FerretDB is not built yet; run '$(rel "$SCRIPT_DIR")/stack.sh up' first"
      PG_BIN="$(find_pg_bin)" || die "no PostgreSQL server found; run '$(rel "$SCRIPT_DIR")/stack.sh up' first"
      pg_probe || die "FerretDB keeps its data in PostgreSQL, which is not running: start it first"
      ferret_start
      ferret_wait
      line ferretdb "$(ready_word "$FERRET_STARTED")" "$HOST:$FERRET_PORT" "$FERRET_LOG"
      ;;
    mailpit)
      [[ -x "$MAILPIT_BIN" ]] || die "Mailpit is not built yet; run '$(rel "$SCRIPT_DIR")/stack.sh up' first"
      mailpit_start
      mailpit_wait
      line mailpit "$(ready_word "$MAILPIT_STARTED")" "$MAILPIT_ADDRESS" "$MAILPIT_LOG"
      ;;
    opensearch)
      JAVA="$(find_java)" || die "no java >= 17 found (OpenSearch 2 needs it); set DBPS_JAVA=/path/to/java"
      ensure_opensearch_libs
      opensearch_start
      opensearch_wait
      line opensearch "$(ready_word "$OPENSEARCH_STARTED")" "$OPENSEARCH_ADDRESS" "$OPENSEARCH_LOG"
      ;;
    toxiproxy)
      if [[ ! -x "$TOXIPROXY_BIN" ]]; then
        GO="$(find_go)" || die "go not found (needed once to build Toxiproxy $TOXIPROXY_VERSION): install Go and put it on PATH"
        start_toxiproxy_build
        finish_toxiproxy_build
      fi
      toxiproxy_start
      toxiproxy_wait
      line toxiproxy "$(ready_word "$TOXIPROXY_STARTED")" "$HOST:$TOXIPROXY_PORT" "$TOXIPROXY_LOG"
      ;;
    *)
      usage >&2
      exit 2
      ;;
  esac
}

# Stop one server (its data stays).
cmd_stop_one() { # server [postgres shutdown mode: fast|immediate]
  case "${2:-fast}" in
    fast | immediate) ;;
    *) die "unknown shutdown mode '$2' for postgres (fast or immediate)" ;;
  esac
  lock
  case "$1" in
    postgres)
      PG_BIN="$(find_pg_bin)" || true
      # FerretDB keeps its data in PostgreSQL and cannot answer without it.
      ferret_stop
      if [[ -n "$PG_BIN" ]]; then
        pg_stop "${2:-fast}"
      else
        line postgres stopped "$HOST:$PG_PORT"
      fi
      ;;
    redis) redis_stop ;;
    kafka) kafka_stop ;;
    ferretdb) ferret_stop ;;
    mailpit) mailpit_stop ;;
    opensearch) opensearch_stop ;;
    toxiproxy) toxiproxy_stop ;;
    *)
      usage >&2
      exit 2
      ;;
  esac
}

usage() {
  cat <<EOF
usage: $(rel "$SCRIPT_DIR")/stack.sh up|down|status|env [--secure]
       $(rel "$SCRIPT_DIR")/stack.sh stop|start postgres|redis|kafka|ferretdb|mailpit|opensearch|toxiproxy
       $(rel "$SCRIPT_DIR")/stack.sh stop postgres [fast|immediate]

  up      install what is missing, start ${SERVERS[*]} on $HOST, wait until ready
  down    stop the servers started by 'up' (and toxiproxy if it runs)
  status  print each server's state; exit 0 if all are up, 3 otherwise
          (toxiproxy is listed only while it runs and does not count otherwise)
  env     print DBPS_* exports:  eval "\$($(rel "$SCRIPT_DIR")/stack.sh env)"
          (plus the secured endpoints' DBPS_*_TLS_*/SECURE/ADMIN variables);
          env --secure: the secured endpoints under the usual names (TLS, logins)
  stop    stop one server (its data stays; stopping postgres stops ferretdb too;
          postgres takes pg_ctl's shutdown mode, fast by default or immediate)
  start   start one server again (after 'up' installed it) and wait until it is ready;
          toxiproxy (on demand, API on $HOST:$TOXIPROXY_PORT) is built first if missing
EOF
}

main() {
  case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status)
      local rc=0
      cmd_status || rc=$?
      exit "$rc"
      ;;
    env)
      if [[ $# -gt 2 ]]; then
        usage >&2
        exit 2
      fi
      cmd_env "${@:2}"
      ;;
    start | stop)
      # Only `stop postgres` takes a third argument (the shutdown mode).
      if [[ $# -ne 2 ]] && ! [[ $# -eq 3 && "$1" == stop && "$2" == postgres ]]; then
        usage >&2
        exit 2
      fi
      "cmd_$1_one" "${@:2}"
      ;;
    -h | --help | help) usage ;;
    *)
      usage >&2
      exit 2
      ;;
  esac
}

main "$@"
