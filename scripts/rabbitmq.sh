#!/usr/bin/env bash
# Starts and stops a private RabbitMQ node, for comparing Warren with
# RabbitMQ (the pika tests in external mode, benchmarks).
#
# The node lives entirely in one directory: its configuration, Mnesia and
# quorum data, logs, pid file and Erlang cookie. It listens for AMQP on
# 127.0.0.1 only, on a free port, and runs its own epmd on a free port with
# its own distribution port, so it never clashes with the system-wide
# `rabbitmq-server` service (which this script never starts, stops or reads
# the configuration of) or with another node started by this script.
#
# Needs RabbitMQ's server scripts: on Debian/Ubuntu `apt-get install -y
# rabbitmq-server` (Debian 12 ships 3.10). If apt starts the system service
# on installation, stop it (`systemctl stop rabbitmq-server`), or prevent
# the start by installing with a /usr/sbin/policy-rc.d that exits 101.
# Also needs python3 (to find free ports).
#
# Usage:
#   scripts/rabbitmq.sh start [DIR]     start a node; DIR defaults to a new
#                                       temporary directory. On success prints
#                                       (stdout) two shell assignments:
#                                         WARREN_RABBITMQ_DIR=/tmp/warren-rabbitmq.XXXX
#                                         WARREN_TEST_EXTERNAL_AMQP=127.0.0.1:PORT
#                                       so `eval "$(scripts/rabbitmq.sh start)"`
#                                       sets both (then `export` them for child
#                                       processes). The AMQP URL is
#                                       amqp://guest:guest@127.0.0.1:PORT/
#                                       Messages are stored under DIR, so for a
#                                       benchmark put DIR on the disk under
#                                       test. The log is DIR/log/rabbit.log.
#   scripts/rabbitmq.sh stop [DIR]      stop the node in DIR (default
#                                       $WARREN_RABBITMQ_DIR), its epmd, and
#                                       delete DIR if start created it.
#   scripts/rabbitmq.sh run CMD [ARG..] start a node, run CMD with
#                                       WARREN_TEST_EXTERNAL_AMQP (and
#                                       WARREN_RABBITMQ_DIR) exported, stop the
#                                       node; exits with CMD's status.
#   scripts/rabbitmq.sh ctl DIR ARG..   run `rabbitmqctl ARG..` against the node
#   scripts/rabbitmq.sh addr [DIR]      print HOST:PORT of a running node
#   scripts/rabbitmq.sh free-ports N    print N TCP ports free on 127.0.0.1
#                                       (benchmarks/compare.sh uses it too)
#
# Environment:
#   RABBITMQ_PORT        AMQP port (default: a free port)
#   RABBITMQ_EXTRA_CONF  extra lines appended to the node's rabbitmq.conf,
#                        e.g. $'consumer_timeout = 5000\nvm_memory_high_watermark.relative = 0.6'
#   RABBITMQ_PLUGINS     plugins to enable, separated by spaces (default none),
#                        e.g. "rabbitmq_management"; its HTTP listener is set
#                        with RABBITMQ_EXTRA_CONF (management.tcp.port = ...)
#   RABBITMQ_ADVANCED_CONFIG  the node's advanced.config (Erlang terms), for
#                        settings rabbitmq.conf lacks; default "[]."
#                        e.g. '[{rabbit, [{channel_tick_interval, 1000}]}].'
#   RABBITMQ_SBIN        directory holding rabbitmq-server and rabbitmqctl
#                        (default: /usr/lib/rabbitmq/bin, Debian's layout)
#   RABBITMQ_START_TIMEOUT  seconds to wait for AMQP (default 90)
#
# Example:
#   scripts/rabbitmq.sh run python -m pytest tests/python/test_extensions.py
set -euo pipefail

SBIN="${RABBITMQ_SBIN:-/usr/lib/rabbitmq/bin}"
START_TIMEOUT="${RABBITMQ_START_TIMEOUT:-90}"

log() { printf 'rabbitmq.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- helpers
# Print N distinct TCP ports that are free on 127.0.0.1 right now, each in
# 20000-32767 (below the usual ephemeral range, so outgoing connections do
# not take them between now and the node binding them).
free_ports() {
    python3 - "$1" <<'PY'
import random, socket, sys
n = int(sys.argv[1]); found = []
for port in random.sample(range(20000, 32768), 2000):
    if len(found) == n:
        break
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    finally:
        s.close()
    found.append(port)
if len(found) < n:
    sys.exit("no free ports")
print(" ".join(map(str, found)))
PY
}

# Is something accepting AMQP on HOST PORT?  Sends the protocol header and
# expects connection.start (a method frame: first byte 1).
amqp_ready() {
    python3 - "$1" "$2" <<'PY'
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
    s.sendall(b"AMQP\x00\x00\x09\x01")
    data = s.recv(1)
    s.close()
    sys.exit(0 if data == b"\x01" else 1)
except OSError:
    sys.exit(1)
PY
}

# Export the environment that points RabbitMQ's scripts at the node in $1
# (read from $1/node.env, written by start).
node_env() {
    local dir="$1"
    [ -f "$dir/node.env" ] || die "$dir has no node.env (not started by this script?)"
    # shellcheck disable=SC1091
    . "$dir/node.env"
    export HOME="$dir"                      # private ~/.erlang.cookie
    export RABBITMQ_NODENAME RABBITMQ_NODE_IP_ADDRESS RABBITMQ_NODE_PORT
    export RABBITMQ_DIST_PORT ERL_EPMD_PORT
    export RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf"
    export RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf"
    export RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config"
    export RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins"
    # The enabled_plugins file in the node directory decides (RABBITMQ_PLUGINS);
    # an empty RABBITMQ_ENABLED_PLUGINS would override it with none.
    unset RABBITMQ_ENABLED_PLUGINS
    export RABBITMQ_MNESIA_BASE="$dir/mnesia"
    export RABBITMQ_MNESIA_DIR="$dir/mnesia/$RABBITMQ_NODENAME"
    export RABBITMQ_LOG_BASE="$dir/log"
    export RABBITMQ_PID_FILE="$dir/rabbitmq.pid"
    export RABBITMQ_LOGS="$dir/log/rabbit.log"
    export RABBITMQ_USE_LONGNAME=false
}

resolve_dir() {
    local dir="${1:-${WARREN_RABBITMQ_DIR:-}}"
    [ -n "$dir" ] || die "no node directory given (argument or \$WARREN_RABBITMQ_DIR)"
    [ -d "$dir" ] || die "$dir does not exist"
    (cd "$dir" && pwd)
}

ctl() {
    # rabbitmqctl of the private node; $1 = dir
    local dir="$1"; shift
    (node_env "$dir" && cd "$dir" && "$SBIN/rabbitmqctl" -n "$RABBITMQ_NODENAME" "$@")
}

node_pid() {
    local dir="$1"
    [ -s "$dir/rabbitmq.pid" ] && cat "$dir/rabbitmq.pid"
}

# ------------------------------------------------------------------ start
cmd_start() {
    [ -x "$SBIN/rabbitmq-server" ] \
        || die "$SBIN/rabbitmq-server not found (apt-get install -y rabbitmq-server, or set RABBITMQ_SBIN)"
    command -v python3 >/dev/null || die "python3 is needed"

    local dir created=0
    if [ -n "${1:-}" ]; then
        dir="$1"
        mkdir -p "$dir"
    else
        dir="$(mktemp -d "${TMPDIR:-/tmp}/warren-rabbitmq.XXXXXX")"
        created=1
    fi
    dir="$(cd "$dir" && pwd)"
    if [ -f "$dir/node.env" ] && [ -n "$(node_pid "$dir" || true)" ] \
        && kill -0 "$(node_pid "$dir")" 2>/dev/null; then
        die "a node is already running in $dir"
    fi

    local ports amqp_port dist_port epmd_port
    ports="$(free_ports 3)"
    read -r amqp_port dist_port epmd_port <<<"$ports"
    amqp_port="${RABBITMQ_PORT:-$amqp_port}"
    local name="warren-rmq-$amqp_port@localhost"

    mkdir -p "$dir/mnesia" "$dir/log"
    cat >"$dir/node.env" <<EOF
RABBITMQ_NODENAME=$name
RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
RABBITMQ_NODE_PORT=$amqp_port
RABBITMQ_DIST_PORT=$dist_port
ERL_EPMD_PORT=$epmd_port
WARREN_RABBITMQ_CREATED_DIR=$created
EOF
    : >"$dir/rabbitmq-env.conf"      # keeps /etc/rabbitmq/rabbitmq-env.conf out
    if [ -n "${RABBITMQ_PLUGINS:-}" ]; then
        # e.g. RABBITMQ_PLUGINS="rabbitmq_management" -> [rabbitmq_management].
        printf '[%s].\n' "$(printf '%s' "$RABBITMQ_PLUGINS" | tr ' ' ',')" >"$dir/enabled_plugins"
    else
        echo '[].' >"$dir/enabled_plugins"
    fi
    printf '%s\n' "${RABBITMQ_ADVANCED_CONFIG:-[].}" >"$dir/advanced.config"
    {
        echo "# private node started by scripts/rabbitmq.sh"
        echo "listeners.tcp.default = 127.0.0.1:$amqp_port"
        echo "log.console = false"
        echo "log.file.level = info"
        # guest may connect from loopback only (RabbitMQ's default).
        if [ -n "${RABBITMQ_EXTRA_CONF:-}" ]; then
            printf '%s\n' "$RABBITMQ_EXTRA_CONF"
        fi
    } >"$dir/rabbitmq.conf"
    # A fresh cookie per node (Erlang reads $HOME/.erlang.cookie).
    python3 -c 'import secrets; print(secrets.token_hex(16).upper(), end="")' >"$dir/.erlang.cookie"
    chmod 400 "$dir/.erlang.cookie"

    log "starting $name (AMQP 127.0.0.1:$amqp_port, distribution $dist_port, epmd $epmd_port) in $dir"
    (
        node_env "$dir"
        cd "$dir"
        # setsid: the node must not get signals meant for our caller's
        # process group (e.g. Ctrl-C in a test run).
        exec setsid "$SBIN/rabbitmq-server" </dev/null >"$dir/log/startup.log" 2>&1
    ) &
    local launcher=$!
    echo "$launcher" >"$dir/launcher.pid"

    local deadline=$((SECONDS + START_TIMEOUT))
    until amqp_ready 127.0.0.1 "$amqp_port"; do
        if ! kill -0 "$launcher" 2>/dev/null; then
            log "rabbitmq-server exited before accepting AMQP; last log lines:"
            tail -n 40 "$dir/log/startup.log" >&2 || true
            tail -n 40 "$dir/log/rabbit.log" >&2 2>/dev/null || true
            cleanup_epmd "$dir"
            exit 1
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "no AMQP on 127.0.0.1:$amqp_port after ${START_TIMEOUT}s; stopping"
            tail -n 40 "$dir/log/startup.log" >&2 || true
            cmd_stop "$dir" || true
            exit 1
        fi
        sleep 0.5
    done
    echo "127.0.0.1:$amqp_port" >"$dir/address"
    log "ready: amqp://guest:guest@127.0.0.1:$amqp_port/ (stop with: $0 stop $dir)"
    echo "WARREN_RABBITMQ_DIR=$dir"
    echo "WARREN_TEST_EXTERNAL_AMQP=127.0.0.1:$amqp_port"
}

# ------------------------------------------------------------------- stop
cleanup_epmd() {
    local dir="$1" port
    port="$(. "$dir/node.env" && echo "$ERL_EPMD_PORT")"
    # Our private epmd (started by the node on its own port); refuses to die
    # while a node is still registered with it, which is what we want.
    ERL_EPMD_PORT="$port" epmd -port "$port" -kill >/dev/null 2>&1 || true
}

cmd_stop() {
    local dir
    dir="$(resolve_dir "${1:-}")"
    [ -f "$dir/node.env" ] || die "$dir has no node.env"
    local pid launcher
    pid="$(node_pid "$dir" || true)"
    launcher="$(cat "$dir/launcher.pid" 2>/dev/null || true)"

    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        log "stopping node in $dir (pid $pid)"
        ctl "$dir" stop >/dev/null 2>&1 || kill -TERM "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + 30))
        while kill -0 "$pid" 2>/dev/null; do
            if [ "$SECONDS" -ge "$deadline" ]; then
                log "node $pid still running after 30s; killing it"
                kill -KILL "$pid" 2>/dev/null || true
                break
            fi
            sleep 0.2
        done
    elif [ -n "$launcher" ] && kill -0 "$launcher" 2>/dev/null; then
        kill -TERM "$launcher" 2>/dev/null || true
    fi
    if [ -n "$launcher" ]; then
        local deadline=$((SECONDS + 10))
        while kill -0 "$launcher" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do
            sleep 0.2
        done
    fi
    cleanup_epmd "$dir"
    if [ "$(. "$dir/node.env" && echo "${WARREN_RABBITMQ_CREATED_DIR:-0}")" = 1 ]; then
        rm -rf "$dir"
        log "stopped; removed $dir"
    else
        rm -f "$dir/rabbitmq.pid" "$dir/launcher.pid" "$dir/address"
        log "stopped"
    fi
}

# -------------------------------------------------------------------- run
cmd_run() {
    [ $# -gt 0 ] || die "run needs a command"
    local out
    out="$(cmd_start)"
    eval "$out"
    export WARREN_RABBITMQ_DIR WARREN_TEST_EXTERNAL_AMQP
    local status=0
    trap 'cmd_stop "$WARREN_RABBITMQ_DIR" || true' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    "$@" || status=$?
    exit "$status"
}

cmd_addr() {
    local dir
    dir="$(resolve_dir "${1:-}")"
    cat "$dir/address"
}

case "${1:-}" in
    start) shift; cmd_start "$@" ;;
    stop) shift; cmd_stop "$@" ;;
    run) shift; cmd_run "$@" ;;
    ctl) shift; [ $# -ge 1 ] || die "ctl DIR ARGS.."; d="$(resolve_dir "$1")"; shift; ctl "$d" "$@" ;;
    addr) shift; cmd_addr "$@" ;;
    free-ports) shift; free_ports "${1:?usage: $0 free-ports N}" ;;
    -h|--help|help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
    *) echo "usage: $0 start [DIR] | stop [DIR] | run CMD [ARGS..] | ctl DIR ARGS.. | addr [DIR] | free-ports N" >&2; exit 2 ;;
esac
