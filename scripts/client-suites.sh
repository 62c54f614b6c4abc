#!/usr/bin/env bash
# Runs AMQP client libraries' own test suites against a broker this script
# starts, and prints one line per suite: how many tests passed, failed and
# were skipped. It compares Warren with RabbitMQ on the same machine:
#
#   bash scripts/client-suites.sh SUITES_DIR                    # against Warren
#   bash scripts/client-suites.sh SUITES_DIR --broker rabbitmq  # against RabbitMQ
#   bash scripts/client-suites.sh SUITES_DIR --only pika,lapin  # some suites
#
# SUITES_DIR holds one checkout per suite, named as the files in
# scripts/client-suites/ (pika, aio-pika, kombu, py-amqp, celery, amqplib,
# rabbitmq-client, lapin, amqp091-go); each of those files says which
# repository its checkout comes from. Suites without a checkout are
# skipped. The first run installs what each suite needs inside its
# checkout (a Python virtualenv, node_modules, cargo's and Go's build
# caches), from PyPI, npm, crates.io and Debian's packages.
#
# Each suite gets a fresh broker: Warren with an empty data directory
# (WARREN_BIN, default target/release/warren), or a private RabbitMQ node
# with its management plugin (scripts/rabbitmq.sh), listening for AMQP on
# port 5672 and HTTP on 15672 of loopback (both families), because several
# suites expect those ports (AMQP_PORT and HTTP_PORT choose others, for
# suites that read the URL from their environment). Logs go to
# SUITES_DIR/logs/BROKER/SUITE.log.
#
# Not part of CI: CI cannot fetch the suites' repositories.
#
# A suite file defines two functions, run from the suite's checkout:
#   suite_setup         installs what the suite needs (idempotent)
#   suite_run LOG       runs the suite against $AMQP_URL, appending its
#                       output to LOG; its last line of stdout is
#                       "PASSED FAILED SKIPPED" (three integers)
# with AMQP_URL, AMQP_HOST, AMQP_PORT, HTTP_PORT, BROKER (warren or
# rabbitmq) and CLIENT_SUITES_SUPPORT (scripts/client-suites/support: JUnit
# and TAP counters, a Node.js preload that sends port 5672 to AMQP_PORT) in
# its environment.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
SUITE_FILES="$ROOT/scripts/client-suites"
# What the suite files share: report counters, the Node.js port redirect.
export CLIENT_SUITES_SUPPORT="$SUITE_FILES/support"

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

[ $# -ge 1 ] || usage 2
case "$1" in -h|--help) usage 0 ;; esac
SUITES_DIR="$(cd "$1" && pwd)"
shift
BROKER=warren
ONLY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --broker) BROKER="$2"; shift 2 ;;
        --only) ONLY="$2"; shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "client-suites.sh: unknown argument '$1'" >&2; usage 2 ;;
    esac
done
case "$BROKER" in warren|rabbitmq) ;; *) echo "client-suites.sh: --broker is warren or rabbitmq" >&2; exit 2 ;; esac

AMQP_PORT="${AMQP_PORT:-5672}"
HTTP_PORT="${HTTP_PORT:-15672}"
export AMQP_HOST=localhost AMQP_PORT HTTP_PORT BROKER
export AMQP_URL="amqp://guest:guest@$AMQP_HOST:$AMQP_PORT/"
WARREN_BIN="${WARREN_BIN:-$ROOT/target/release/warren}"
LOG_DIR="$SUITES_DIR/logs/$BROKER"
mkdir -p "$LOG_DIR"

port_open() {
    python3 - "$1" <<'PY'
import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close()
except OSError:
    sys.exit(1)
PY
}

wait_for_port() {
    local port="$1" deadline=$((SECONDS + 90))
    until port_open "$port"; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "client-suites.sh: nothing listens on port $port after 90 s" >&2
            return 1
        fi
        sleep 0.2
    done
}

BROKER_PID=""
BROKER_DIR=""

start_broker() {
    for port in "$AMQP_PORT" "$HTTP_PORT"; do
        if port_open "$port"; then
            echo "client-suites.sh: port $port is already in use; stop what holds it" >&2
            exit 1
        fi
    done
    BROKER_DIR="$(mktemp -d /tmp/client-suites.XXXXXX)"
    if [ "$BROKER" = warren ]; then
        "$WARREN_BIN" serve --amqp-listen "[::]:$AMQP_PORT" --http-listen "[::]:$HTTP_PORT" \
            --data-dir "$BROKER_DIR/data" >"$BROKER_DIR/warren.log" 2>&1 &
        BROKER_PID=$!
    else
        RABBITMQ_PORT="$AMQP_PORT" RABBITMQ_PLUGINS="rabbitmq_management" \
            RABBITMQ_EXTRA_CONF="listeners.tcp.2 = ::1:$AMQP_PORT
management.tcp.port = $HTTP_PORT" \
            bash "$ROOT/scripts/rabbitmq.sh" start "$BROKER_DIR/rabbitmq" >/dev/null
    fi
    wait_for_port "$AMQP_PORT"
    wait_for_port "$HTTP_PORT"
}

stop_broker() {
    if [ -n "$BROKER_PID" ]; then
        kill "$BROKER_PID" 2>/dev/null || true
        wait "$BROKER_PID" 2>/dev/null || true
        BROKER_PID=""
    elif [ -n "$BROKER_DIR" ] && [ -d "$BROKER_DIR/rabbitmq" ]; then
        bash "$ROOT/scripts/rabbitmq.sh" stop "$BROKER_DIR/rabbitmq" >/dev/null 2>&1 || true
    fi
    [ -n "$BROKER_DIR" ] && rm -rf "$BROKER_DIR"
    BROKER_DIR=""
}
trap stop_broker EXIT

if [ "$BROKER" = warren ] && [ ! -x "$WARREN_BIN" ]; then
    echo "client-suites.sh: $WARREN_BIN is missing (cargo build --release -p warren)" >&2
    exit 1
fi

printf '%-16s %-8s %7s %7s %7s\n' suite result passed failed skipped
for file in "$SUITE_FILES"/*.sh; do
    name="$(basename "$file" .sh)"
    if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then
        continue
    fi
    checkout="$SUITES_DIR/$name"
    if [ ! -d "$checkout" ]; then
        printf '%-16s %-8s\n' "$name" "absent"
        continue
    fi
    log="$LOG_DIR/$name.log"
    : >"$log"
    if ! (cd "$checkout" && source "$file" && suite_setup) >>"$log" 2>&1; then
        printf '%-16s %-8s (setup failed, see %s)\n' "$name" "error" "$log"
        continue
    fi
    start_broker
    counts="$( (cd "$checkout" && source "$file" && suite_run "$log") 2>>"$log" | tail -n 1)" || true
    stop_broker
    if [[ "$counts" =~ ^([0-9]+)\ ([0-9]+)\ ([0-9]+)$ ]]; then
        passed="${BASH_REMATCH[1]}" failed="${BASH_REMATCH[2]}" skipped="${BASH_REMATCH[3]}"
        result=pass
        [ "$failed" -gt 0 ] && result=fail
        printf '%-16s %-8s %7s %7s %7s\n' "$name" "$result" "$passed" "$failed" "$skipped"
    else
        printf '%-16s %-8s (no counts, see %s)\n' "$name" "error" "$log"
    fi
done
