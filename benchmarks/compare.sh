#!/usr/bin/env bash
# Runs the same warren-bench scenarios against Warren and against RabbitMQ
# (Debian's rabbitmq-server package) on this machine, alternately, and writes
# BENCHMARKS.md at the repository root from the results (benchmarks/report.py).
#
# On a fresh Debian/Ubuntu machine, as root:
#
#   bash benchmarks/compare.sh                         # everything, 3 rounds
#   QUICK=1 ROUNDS=1 bash benchmarks/compare.sh        # a short trial run
#   SCENARIOS="1 2" ROUNDS=5 bash benchmarks/compare.sh
#   SCENARIOS=7 STALL_DISRUPTIONS=declare bash benchmarks/compare.sh
#
# What it does:
#   1. installs rabbitmq-server (and python3) with apt-get when missing, with a
#      temporary /usr/sbin/policy-rc.d that exits 101 so apt does not start
#      the system-wide RabbitMQ service (as scripts/test.sh does);
#   2. cargo build --release -p warren -p warren-bench (once; BUILD=0 skips);
#   3. for each scenario, ROUNDS rounds of: Warren, then RabbitMQ (A, B, A,
#      B, ...), so drift of the machine during the run hits both alike.
#      Scenarios 7 and 8 make several runs per round, one per variant (each
#      disruption, each queue count), each variant against both brokers. Every
#      run gets a freshly started broker with an empty data directory, and
#      only the broker under test is running while it is measured; memory
#      numbers therefore never carry over from an earlier run. Warren is
#      `target/release/warren serve` on free loopback ports; RabbitMQ is a
#      private node from scripts/rabbitmq.sh with default settings. Both keep
#      their data under WORK_DIR (one disk). warren-bench gets --broker-pid of
#      the broker under test (RabbitMQ: beam.smp, from the node's pid file)
#      and writes --json into RESULTS_DIR;
#   4. python3 benchmarks/report.py RESULTS_DIR --out BENCHMARKS.md.
#
# Scenarios (issue 7):
#   1  transient 16 B, 1 producer 1 consumer, no confirms, auto-ack
#   2  persistent 1 KiB to a durable queue, 4 producers with confirms (window
#      256), 2 consumers manual ack prefetch 100
#   3  fixed 10,000 msg/s persistent 1 KiB, confirms (window 256), 1 producer,
#      1 consumer manual ack: latency
#   4  fan-out: 1 producer to a fanout exchange bound to 10 queues, 10
#      consumers (one per queue), transient 1 KiB, no confirms, auto-ack
#   5  prefill 1,000,000 persistent 1 KiB messages (confirms, window 256),
#      then drain them (manual ack, prefetch 100): rates and broker RSS
#   6  1,000 idle connections with a channel each: broker RSS per connection
#      (needs warren-bench --idle-connections)
#   7  stall probe: a probe publishes and consumes 1,000 msg/s on a queue of
#      its own while a second client disrupts the broker, one run per
#      disruption: unacked-close (requeue 100,000 unacked deliveries),
#      declare (10,000 durable queues), paged-drain (200,000 persistent
#      1 KiB, mostly paged to disk, then drained), connection-churn (1,000
#      connections opened and closed); reports the probe's p99.9, worst
#      latency and longest silence, and how long the disruption took (needs
#      warren-bench --stall)
#   8  independent queues: 1, 2 and 4 queues, each with its own producer and
#      consumer (transient 16 B, no confirms, auto-ack); total throughput per
#      queue count shows how it grows with queues
#
# Environment:
#   ROUNDS=3            rounds per scenario (each round runs both brokers)
#   QUICK=0             1: short trial (5 s runs, 50,000-message prefill,
#                       2 s idle hold); not for publishing
#   SCENARIOS="1 2 3 4 5 6 7 8"   the scenarios to run, in this order
#   RESULTS_DIR         where JSON, logs and the command lines go
#                       (default target/benchmarks/<UTC time>)
#   WORK_DIR            broker data directories (default target/benchmarks/work;
#                       each run's directory is deleted after it)
#   REPORT              the report to write (default BENCHMARKS.md at the root)
#   BROKERS="warren rabbitmq"  which brokers to run (both for a comparison)
#   BUILD=1             0: use the existing target/release binaries
#   DURATION            seconds per run of scenarios 1-4 and 8 (default 20; QUICK 5)
#   PREFILL_COUNT       messages of scenario 5 (default 1000000; QUICK 50000)
#   PHASE_TIMEOUT       limit per prefill/drain phase, s (default 900; QUICK 120)
#   IDLE_CONNECTIONS    connections of scenario 6 (default 1000)
#   IDLE_HOLD           seconds scenario 6 holds them (default 10; QUICK 2)
#   STALL_DISRUPTIONS="unacked-close declare paged-drain connection-churn"
#                       the disruptions scenario 7 runs, in this order
#   PROBE_RATE          scenario 7's probe rate, msg/s (default 1000)
#   STALL_PIN=0         1: in scenario 7, start the broker on CPU 0 alone and
#                       warren-bench on the other CPUs (taskset), so that on a
#                       small machine the probe measures what the broker does
#                       to it rather than the CPU the disrupting client and
#                       the probe share; both brokers alike, each sizing its
#                       schedulers to the one CPU it sees. Within warren-bench
#                       the disrupting client always runs at a lower priority
#                       than the probe (nice 10), pinned or not
#   STALL_TIMEOUT       limit on each scenario 7 disruption, s (default 600;
#                       QUICK 120)
#   QUEUE_COUNTS="1 2 4"  the queue counts scenario 8 runs, in this order
#   MULTI_QUEUE_SIZE    scenario 8's message size, bytes (default 16)
#   COOLDOWN            seconds of pause after each broker stops (default 3)
#   RABBITMQ_SBIN       RabbitMQ's scripts (default /usr/lib/rabbitmq/bin)
#
# Output: RESULTS_DIR holds s<N>-r<R>-<broker>.json (warren-bench --json;
# s<N>-<variant>-r<R>-<broker>.json for scenarios 7 and 8),
# .txt (its summary), .stderr, logs/ (broker logs), runs.jsonl (one line per
# run: exit status, exact commands), commands.txt, meta.json (machine and
# settings) and compare.log. Re-render the report alone with
#   python3 benchmarks/report.py RESULTS_DIR --out BENCHMARKS.md
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"

# ------------------------------------------------------------- settings
ROUNDS="${ROUNDS:-3}"
QUICK="${QUICK:-0}"
SCENARIOS="${SCENARIOS:-1 2 3 4 5 6 7 8}"
BROKERS="${BROKERS:-warren rabbitmq}"
BUILD="${BUILD:-1}"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
RESULTS_DIR="${RESULTS_DIR:-target/benchmarks/$STAMP}"
WORK_DIR="${WORK_DIR:-target/benchmarks/work}"
REPORT="${REPORT:-BENCHMARKS.md}"
SBIN="${RABBITMQ_SBIN:-/usr/lib/rabbitmq/bin}"
COOLDOWN="${COOLDOWN:-3}"
if [ "$QUICK" = 1 ]; then
    DURATION="${DURATION:-5}"
    PREFILL_COUNT="${PREFILL_COUNT:-50000}"
    PHASE_TIMEOUT="${PHASE_TIMEOUT:-120}"
    IDLE_HOLD="${IDLE_HOLD:-2}"
    STALL_TIMEOUT="${STALL_TIMEOUT:-120}"
else
    DURATION="${DURATION:-20}"
    PREFILL_COUNT="${PREFILL_COUNT:-1000000}"
    PHASE_TIMEOUT="${PHASE_TIMEOUT:-900}"
    IDLE_HOLD="${IDLE_HOLD:-10}"
    STALL_TIMEOUT="${STALL_TIMEOUT:-600}"
fi
IDLE_CONNECTIONS="${IDLE_CONNECTIONS:-1000}"
STALL_DISRUPTIONS="${STALL_DISRUPTIONS:-unacked-close declare paged-drain connection-churn}"
STALL_PIN="${STALL_PIN:-0}"
PROBE_RATE="${PROBE_RATE:-1000}"
QUEUE_COUNTS="${QUEUE_COUNTS:-1 2 4}"
MULTI_QUEUE_SIZE="${MULTI_QUEUE_SIZE:-16}"
WARREN_START_TIMEOUT="${WARREN_START_TIMEOUT:-60}"

WARREN_BIN="target/release/warren"
BENCH_BIN="target/release/warren-bench"

# ------------------------------------------------------------- helpers
LOG_FILE=""
log() {
    local line
    line="$(printf '[compare %s] %s' "$(date +%H:%M:%S)" "$*")"
    printf '%s\n' "$line" >&2
    if [ -n "$LOG_FILE" ]; then printf '%s\n' "$line" >>"$LOG_FILE"; fi
}
die() { log "error: $*"; exit 1; }

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

# Appends one JSON object (from KEY=VALUE arguments) to runs.jsonl.
manifest_add() {
    python3 -c '
import json, sys
record = dict(arg.split("=", 1) for arg in sys.argv[2:])
with open(sys.argv[1], "a") as out:
    out.write(json.dumps(record) + "\n")
' "$RESULTS_DIR/runs.jsonl" "$@"
}

quote_cmd() { local out; out="$(printf '%q ' "$@")"; printf '%s' "${out% }"; }

# ------------------------------------------------------------- cleanup
# State of what is running, for the EXIT trap.
WARREN_PID=""
WARREN_DATA=""
RABBIT_DIR=""
BENCH_PID=""
RESULTS_STARTED=0
POLICY_RC_ACTIVE=0
POLICY_RC_SAVED=""
POLICY_RC=/usr/sbin/policy-rc.d

restore_policy_rc() {
    [ "$POLICY_RC_ACTIVE" = 1 ] || return 0
    if [ -n "$POLICY_RC_SAVED" ]; then
        mv -f "$POLICY_RC_SAVED" "$POLICY_RC"
    else
        rm -f "$POLICY_RC"
    fi
    POLICY_RC_ACTIVE=0
}

stop_warren() {
    [ -n "$WARREN_PID" ] || return 0
    local pid="$WARREN_PID"
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + 30))
        while kill -0 "$pid" 2>/dev/null; do
            if [ "$SECONDS" -ge "$deadline" ]; then
                log "warren (pid $pid) still running 30 s after SIGTERM; killing it"
                kill -KILL "$pid" 2>/dev/null || true
                break
            fi
            sleep 0.2
        done
    fi
    wait "$pid" 2>/dev/null || true
    WARREN_PID=""
    if [ -n "$WARREN_DATA" ]; then
        rm -rf "$WARREN_DATA"
        WARREN_DATA=""
    fi
}

stop_rabbitmq() {
    [ -n "$RABBIT_DIR" ] || return 0
    local dir="$RABBIT_DIR" logs_to="${1:-}"
    bash scripts/rabbitmq.sh stop "$dir" >>"$RESULTS_DIR/logs/rabbitmq.sh.log" 2>&1 \
        || log "warning: scripts/rabbitmq.sh stop $dir failed (see logs/rabbitmq.sh.log)"
    if [ -n "$logs_to" ] && [ -d "$dir/log" ]; then
        mkdir -p "$logs_to"
        cp -p "$dir"/log/*.log "$logs_to"/ 2>/dev/null || true
    fi
    rm -rf "$dir"
    RABBIT_DIR=""
}

cleanup() {
    local status=$?
    set +e
    trap - INT TERM
    if [ -n "$BENCH_PID" ] && kill -0 "$BENCH_PID" 2>/dev/null; then
        log "stopping warren-bench (pid $BENCH_PID)"
        kill -TERM "$BENCH_PID" 2>/dev/null
        wait "$BENCH_PID" 2>/dev/null
    fi
    if [ -n "$WARREN_PID" ]; then log "stopping Warren (pid $WARREN_PID)"; stop_warren; fi
    if [ -n "$RABBIT_DIR" ]; then log "stopping RabbitMQ in $RABBIT_DIR"; stop_rabbitmq; fi
    restore_policy_rc
    if [ "$status" -ne 0 ]; then
        if [ "$RESULTS_STARTED" = 1 ]; then
            log "exited with status $status; partial results in $RESULTS_DIR" \
                "(python3 benchmarks/report.py $RESULTS_DIR --out FILE renders them)"
        else
            log "exited with status $status"
        fi
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------- checks
for name in ROUNDS DURATION PREFILL_COUNT PHASE_TIMEOUT IDLE_CONNECTIONS IDLE_HOLD COOLDOWN \
    PROBE_RATE STALL_TIMEOUT MULTI_QUEUE_SIZE; do
    is_uint "${!name}" || die "$name must be a whole number, got '${!name}'"
done
[ "$ROUNDS" -ge 1 ] || die "ROUNDS must be at least 1"
for s in $SCENARIOS; do
    case "$s" in 1|2|3|4|5|6|7|8) ;; *) die "unknown scenario '$s' in SCENARIOS (1-8)" ;; esac
done
for d in $STALL_DISRUPTIONS; do
    case "$d" in
        unacked-close|declare|paged-drain|connection-churn) ;;
        *) die "unknown disruption '$d' in STALL_DISRUPTIONS (unacked-close, declare, paged-drain, connection-churn)" ;;
    esac
done
case "$STALL_PIN" in
    0) ;;
    1) command -v taskset >/dev/null 2>&1 || die "STALL_PIN=1 needs taskset (util-linux)"
       [ "$(nproc)" -ge 2 ] || die "STALL_PIN=1 needs at least 2 CPUs" ;;
    *) die "STALL_PIN must be 0 or 1, got '$STALL_PIN'" ;;
esac
for q in $QUEUE_COUNTS; do
    is_uint "$q" && [ "$q" -ge 1 ] || die "QUEUE_COUNTS must be whole numbers of at least 1, got '$q'"
done
for b in $BROKERS; do
    case "$b" in warren|rabbitmq) ;; *) die "unknown broker '$b' in BROKERS (warren, rabbitmq)" ;; esac
done
[ -n "$SCENARIOS" ] || die "SCENARIOS is empty"

# ------------------------------------------------------------- install
apt_install() {
    # apt_install PKG..: installs with services kept from starting.
    [ "$(id -u)" -eq 0 ] || die "$* missing; run as root so apt-get can install it, or install it first"
    command -v apt-get >/dev/null 2>&1 || die "$* missing and there is no apt-get; install it first"
    log "apt-get install -y $* (services kept from starting by $POLICY_RC)"
    if [ -e "$POLICY_RC" ]; then
        POLICY_RC_SAVED="$(mktemp)"
        cp -p "$POLICY_RC" "$POLICY_RC_SAVED"
    fi
    POLICY_RC_ACTIVE=1
    printf '#!/bin/sh\n# Keeps apt from starting services (benchmarks/compare.sh).\nexit 101\n' >"$POLICY_RC"
    chmod 755 "$POLICY_RC"
    local status=0
    { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y "$@"; } || status=$?
    restore_policy_rc
    [ "$status" -eq 0 ] || die "apt-get install $* failed (exit $status)"
}

needed=()
if [ "$BROKERS" != "${BROKERS/rabbitmq/}" ] \
    && { [ ! -x "$SBIN/rabbitmq-server" ] || [ ! -x "$SBIN/rabbitmqctl" ]; }; then
    needed+=(rabbitmq-server)
fi
command -v python3 >/dev/null 2>&1 || needed+=(python3)
if [ "${#needed[@]}" -gt 0 ]; then
    apt_install "${needed[@]}"
fi
if [ "$BROKERS" != "${BROKERS/rabbitmq/}" ]; then
    [ -x "$SBIN/rabbitmq-server" ] || die "$SBIN/rabbitmq-server still missing"
fi
for tool in timeout python3; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is needed"
done

# ------------------------------------------------------------- build
if [ "$BUILD" = 1 ]; then
    command -v cargo >/dev/null 2>&1 \
        || die "cargo not found: install Rust >= 1.88 (https://rustup.rs), or BUILD=0 with prebuilt binaries"
    log "cargo build --release -p warren -p warren-bench"
    cargo build --release -p warren -p warren-bench
fi
[ -x "$WARREN_BIN" ] || die "$WARREN_BIN missing (BUILD=1 builds it)"
[ -x "$BENCH_BIN" ] || die "$BENCH_BIN missing (BUILD=1 builds it)"

case " $SCENARIOS " in
    *" 6 "*)
        bench_help="$("$BENCH_BIN" --help 2>/dev/null || true)"
        [[ "$bench_help" == *--idle-connections* ]] \
            || die "$BENCH_BIN has no --idle-connections (needed by scenario 6); rebuild it or leave 6 out of SCENARIOS" ;;
esac
case " $SCENARIOS " in
    *" 7 "*)
        bench_help="$("$BENCH_BIN" --help 2>/dev/null || true)"
        [[ "$bench_help" == *--stall* ]] \
            || die "$BENCH_BIN has no --stall (needed by scenario 7); rebuild it or leave 7 out of SCENARIOS" ;;
esac

# Scenario 6 needs about 2 descriptors per connection in the bench and one
# in the broker; RabbitMQ inherits this limit from us.
fd_hard="$(ulimit -Hn)"
fd_want=65536
if [ "$fd_hard" != unlimited ] && [ "$fd_hard" -lt "$fd_want" ]; then fd_want="$fd_hard"; fi
if [ "$(ulimit -Sn)" != unlimited ] && [ "$(ulimit -Sn)" -lt "$fd_want" ]; then
    ulimit -Sn "$fd_want" || log "warning: could not raise the open-files limit to $fd_want"
fi

# ------------------------------------------------------------- directories
mkdir -p "$RESULTS_DIR/logs" "$WORK_DIR"
RESULTS_DIR="$(cd "$RESULTS_DIR" && pwd)"
WORK_DIR="$(cd "$WORK_DIR" && pwd)"
# Paths under the repository are recorded relative to it (commands run here).
rel() { case "$1" in "$ROOT"/*) printf '%s' "${1#"$ROOT"/}" ;; *) printf '%s' "$1" ;; esac; }
RESULTS_REL="$(rel "$RESULTS_DIR")"
[ ! -e "$RESULTS_DIR/runs.jsonl" ] || die "$RESULTS_DIR already holds results (runs.jsonl); pick a new RESULTS_DIR"
: >"$RESULTS_DIR/runs.jsonl"
RESULTS_STARTED=1
: >"$RESULTS_DIR/commands.txt"
LOG_FILE="$RESULTS_DIR/compare.log"
: >"$LOG_FILE"

invocation="ROUNDS=$ROUNDS QUICK=$QUICK SCENARIOS=\"$SCENARIOS\""
[ "$BROKERS" = "warren rabbitmq" ] || invocation+=" BROKERS=\"$BROKERS\""
[ "$STALL_PIN" = 0 ] || invocation+=" STALL_PIN=$STALL_PIN"
invocation+=" bash benchmarks/compare.sh"
log "results: $RESULTS_DIR; broker data: $WORK_DIR"
log "scenarios: $SCENARIOS; rounds: $ROUNDS; brokers: $BROKERS; quick: $QUICK"

python3 benchmarks/report.py machine-info "$RESULTS_DIR/meta.json" \
    "invocation=$invocation" "rounds=$ROUNDS" "quick=$QUICK" "scenarios=$SCENARIOS" \
    "brokers=$BROKERS" "duration_s=$DURATION" "prefill_count=$PREFILL_COUNT" \
    "phase_timeout_s=$PHASE_TIMEOUT" "idle_connections=$IDLE_CONNECTIONS" \
    "idle_hold_s=$IDLE_HOLD" "stall_disruptions=$STALL_DISRUPTIONS" \
    "probe_rate=$PROBE_RATE" "stall_timeout_s=$STALL_TIMEOUT" "stall_pin=$STALL_PIN" \
    "queue_counts=$QUEUE_COUNTS" "multi_queue_size=$MULTI_QUEUE_SIZE" \
    "work_dir=$WORK_DIR" "results_dir=$RESULTS_REL" \
    "warren_bin=$WARREN_BIN" "bench_bin=$BENCH_BIN" "rabbitmq_sbin=$SBIN" \
    "open_files_limit=$(ulimit -Sn)" \
    || die "collecting machine information failed"

free_kib="$(df -Pk "$WORK_DIR" | awk 'NR == 2 { print $4 }')"
case " $SCENARIOS " in
    *" 5 "*)
        need_kib=$(( PREFILL_COUNT * 3 ))   # ~1 KiB body + overhead, with margin
        if [ -n "$free_kib" ] && [ "$free_kib" -lt "$need_kib" ]; then
            log "warning: $((free_kib / 1024)) MiB free under $WORK_DIR; scenario 5 may need about $((need_kib / 1024)) MiB"
        fi ;;
esac

# ------------------------------------------------------------- scenarios
# scenario_variants N: the runs scenario N makes per round and broker: its
# disruptions (7), its queue counts as qN (8), or "-" (one run).
scenario_variants() {
    case "$1" in
        7) printf '%s' "$STALL_DISRUPTIONS" ;;
        8) for q in $QUEUE_COUNTS; do printf 'q%s ' "$q"; done ;;
        *) printf '%s' - ;;
    esac
}

# scenario_args N VARIANT: sets SCENARIO_ARGS (warren-bench options besides
# --url, --broker-pid, --json, --quiet) and SCENARIO_LIMIT (seconds before
# timeout).
scenario_args() {
    local duration_limit=$((DURATION + 180)) variant="${2:--}"
    case "$1" in
        1) SCENARIO_ARGS=(--producers 1 --consumers 1 --size 16 --transient
                          --confirm 0 --ack auto --duration "$DURATION")
           SCENARIO_LIMIT=$duration_limit ;;
        2) SCENARIO_ARGS=(--producers 4 --consumers 2 --size 1024 --persistent
                          --confirm 256 --ack manual --prefetch 100 --duration "$DURATION")
           SCENARIO_LIMIT=$duration_limit ;;
        3) SCENARIO_ARGS=(--producers 1 --consumers 1 --size 1024 --persistent
                          --confirm 256 --ack manual --prefetch 100 --rate 10000
                          --duration "$DURATION")
           SCENARIO_LIMIT=$duration_limit ;;
        4) SCENARIO_ARGS=(--producers 1 --consumers 10 --queues 10 --exchange-fanout
                          --size 1024 --transient --confirm 0 --ack auto
                          --duration "$DURATION")
           SCENARIO_LIMIT=$duration_limit ;;
        5) SCENARIO_ARGS=(--producers 1 --consumers 1 --size 1024 --persistent
                          --confirm 256 --ack manual --prefetch 100
                          --prefill "$PREFILL_COUNT" --drain-timeout "$PHASE_TIMEOUT")
           SCENARIO_LIMIT=$((2 * PHASE_TIMEOUT + 300)) ;;
        6) SCENARIO_ARGS=(--idle-connections "$IDLE_CONNECTIONS" --idle-hold "$IDLE_HOLD")
           SCENARIO_LIMIT=$((IDLE_HOLD + 600)) ;;
        # The disruption's own default count (see warren-bench --help).
        7) SCENARIO_ARGS=(--stall "$variant" --probe-rate "$PROBE_RATE"
                          --stall-timeout "$STALL_TIMEOUT")
           SCENARIO_LIMIT=$((STALL_TIMEOUT + 300)) ;;
        # Producer i and consumer i both go to queue i mod N (warren-bench
        # assigns round-robin), so N of each give every queue its own pair.
        8) local queues="${variant#q}"
           SCENARIO_ARGS=(--queues "$queues" --producers "$queues" --consumers "$queues"
                          --size "$MULTI_QUEUE_SIZE" --transient --confirm 0 --ack auto
                          --duration "$DURATION")
           SCENARIO_LIMIT=$duration_limit ;;
    esac
}

# start_broker KIND NAME: sets BROKER_URL, BROKER_PID, BROKER_CMD. The
# broker starts under BROKER_PIN (a taskset prefix, or empty).
BROKER_PIN=()
start_broker() {
    local kind="$1" name="$2"
    case "$kind" in
        warren)
            local ports amqp_port http_port
            ports="$(bash "$ROOT/scripts/rabbitmq.sh" free-ports 2)" || die "no free ports"
            read -r amqp_port http_port <<<"$ports"
            WARREN_DATA="$WORK_DIR/$name-data"
            rm -rf "$WARREN_DATA"
            mkdir -p "$WARREN_DATA"
            local log_file="$RESULTS_DIR/logs/$name.log"
            local cmd=("${BROKER_PIN[@]}" "$WARREN_BIN" serve --amqp-listen "127.0.0.1:$amqp_port"
                       --http-listen "127.0.0.1:$http_port" --data-dir "$(rel "$WARREN_DATA")")
            BROKER_CMD="$(quote_cmd "${cmd[@]}")"
            "${cmd[@]}" </dev/null >"$log_file" 2>&1 &
            WARREN_PID=$!
            local deadline=$((SECONDS + WARREN_START_TIMEOUT))
            # (grep -c reads all its input: no SIGPIPE for sed under pipefail)
            until sed 's/\x1b\[[0-9;]*m//g' "$log_file" | grep -c 'AMQP listener ready addr=' >/dev/null; do
                if ! kill -0 "$WARREN_PID" 2>/dev/null; then
                    tail -n 30 "$log_file" >&2 || true
                    WARREN_PID=""
                    die "warren exited before its AMQP listener was ready (log: $log_file)"
                fi
                if [ "$SECONDS" -ge "$deadline" ]; then
                    tail -n 30 "$log_file" >&2 || true
                    die "warren not ready after ${WARREN_START_TIMEOUT}s (log: $log_file)"
                fi
                sleep 0.1
            done
            BROKER_URL="amqp://guest:guest@127.0.0.1:$amqp_port/%2f"
            BROKER_PID="$WARREN_PID"
            ;;
        rabbitmq)
            RABBIT_DIR="$WORK_DIR/$name-node"
            rm -rf "$RABBIT_DIR"
            local out
            out="$("${BROKER_PIN[@]}" bash scripts/rabbitmq.sh start "$RABBIT_DIR" 2>>"$RESULTS_DIR/logs/rabbitmq.sh.log")" \
                || { tail -n 30 "$RESULTS_DIR/logs/rabbitmq.sh.log" >&2; \
                     die "scripts/rabbitmq.sh start failed (log: $RESULTS_DIR/logs/rabbitmq.sh.log)"; }
            local WARREN_TEST_EXTERNAL_AMQP=""
            eval "$out"
            [ -n "$WARREN_TEST_EXTERNAL_AMQP" ] || die "scripts/rabbitmq.sh start printed no address"
            BROKER_CMD="$(quote_cmd "${BROKER_PIN[@]}" bash scripts/rabbitmq.sh start "$(rel "$RABBIT_DIR")")"
            # The node's pid file holds the Erlang VM's pid (beam.smp).
            local deadline=$((SECONDS + 30)) pid=""
            while :; do
                pid="$(cat "$RABBIT_DIR/rabbitmq.pid" 2>/dev/null || true)"
                if is_uint "$pid" && kill -0 "$pid" 2>/dev/null; then break; fi
                [ "$SECONDS" -lt "$deadline" ] || die "no live pid in $RABBIT_DIR/rabbitmq.pid"
                sleep 0.2
            done
            local comm
            comm="$(cat "/proc/$pid/comm" 2>/dev/null || true)"
            case "$comm" in
                beam*) ;;
                *) log "warning: RabbitMQ pid $pid is '$comm', not beam.smp" ;;
            esac
            BROKER_URL="amqp://guest:guest@$WARREN_TEST_EXTERNAL_AMQP/%2f"
            BROKER_PID="$pid"
            ;;
    esac
}

stop_broker() {
    local kind="$1" name="$2"
    case "$kind" in
        warren) stop_warren ;;
        rabbitmq) stop_rabbitmq "$RESULTS_DIR/logs/$name-node" ;;
    esac
    # Flush the deleted run's dirty pages so they do not slow the next one.
    sync
    sleep "$COOLDOWN"
}

# run_one SCENARIO ROUND KIND [VARIANT]
FAILED_RUNS=0
run_one() {
    local scenario="$1" round="$2" kind="$3" variant="${4:--}"
    local name="s$scenario-r$round-$kind" label="scenario $scenario"
    if [ "$variant" != - ]; then
        name="s$scenario-$variant-r$round-$kind"
        label="scenario $scenario ($variant)"
    fi
    scenario_args "$scenario" "$variant"
    local bench_pin=()
    BROKER_PIN=()
    if [ "$scenario" = 7 ] && [ "$STALL_PIN" = 1 ]; then
        BROKER_PIN=(taskset -c 0)
        bench_pin=(taskset -c "1-$(($(nproc) - 1))")
    fi
    log "$label, round $round/$ROUNDS, $kind: starting broker"
    start_broker "$kind" "$name"
    local json="$RESULTS_DIR/$name.json"
    local cmd=("${bench_pin[@]}" "$BENCH_BIN" --url "$BROKER_URL" "${SCENARIO_ARGS[@]}"
               --broker-pid "$BROKER_PID" --json "$RESULTS_REL/$name.json" --quiet)
    local cmd_text
    cmd_text="$(quote_cmd "${cmd[@]}")"
    log "$label, round $round/$ROUNDS, $kind (pid $BROKER_PID): $cmd_text"
    local started ended status=0
    started="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    timeout --kill-after=30 "$SCENARIO_LIMIT" "${cmd[@]}" \
        >"$RESULTS_DIR/$name.txt" 2>"$RESULTS_DIR/$name.stderr" &
    BENCH_PID=$!
    wait "$BENCH_PID" || status=$?
    BENCH_PID=""
    ended="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    if [ ! -d "/proc/$BROKER_PID" ]; then
        log "warning: the $kind broker (pid $BROKER_PID) is gone after the run"
    fi
    stop_broker "$kind" "$name"

    if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
        log "$label, round $round, $kind: TIMED OUT after ${SCENARIO_LIMIT}s"
    elif [ "$status" -ne 0 ]; then
        log "$label, round $round, $kind: warren-bench exited $status; see $name.stderr"
        tail -n 5 "$RESULTS_DIR/$name.stderr" >&2 || true
    fi
    [ "$status" -eq 0 ] || FAILED_RUNS=$((FAILED_RUNS + 1))
    if [ -s "$json" ]; then
        log "  $(python3 benchmarks/report.py summary "$json" 2>/dev/null || echo 'unreadable JSON')"
    else
        log "  no JSON written"
    fi
    manifest_add "scenario=$scenario" "variant=$([ "$variant" = - ] || printf '%s' "$variant")" \
        "round=$round" "broker=$kind" "status=$status" \
        "json=$name.json" "stdout=$name.txt" "stderr=$name.stderr" \
        "started=$started" "ended=$ended" "broker_pid=$BROKER_PID" \
        "broker_command=$BROKER_CMD" "command=$cmd_text"
    {
        printf '# %s, round %s, %s (exit %s)\n' "$label" "$round" "$kind" "$status"
        printf '%s\n%s\n\n' "$BROKER_CMD" "$cmd_text"
    } >>"$RESULTS_DIR/commands.txt"
}

# ------------------------------------------------------------- main loop
total=0
for scenario in $SCENARIOS; do
    for round in $(seq 1 "$ROUNDS"); do
        for variant in $(scenario_variants "$scenario"); do
            for kind in $BROKERS; do
                run_one "$scenario" "$round" "$kind" "$variant"
                total=$((total + 1))
            done
        done
    done
done
log "$total runs done, $FAILED_RUNS with a non-zero exit"

case "$REPORT" in /*) ;; *) REPORT="$ROOT/$REPORT" ;; esac
python3 benchmarks/report.py "$RESULTS_DIR" --out "$REPORT" \
    || die "benchmarks/report.py failed; the raw results are in $RESULTS_DIR"
log "done: report $REPORT; raw results $RESULTS_DIR"
echo "BENCHMARKS.md: $REPORT  raw results: $RESULTS_DIR"
