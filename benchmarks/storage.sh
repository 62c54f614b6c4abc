#!/usr/bin/env bash
# The storage measurements of docs/storage-format.md and BENCHMARKS.md, on
# one Warren binary:
#
#   backlog   prefill N persistent 16-byte messages into one durable queue
#             (confirms, window 256): broker RSS after the prefill, prefill
#             and drain rates, the data directory's size 1 to 6 s after the
#             drain
#   restart   publish for RESTART_PUBLISH_S seconds into one durable queue
#             with no consumer, stop the broker cleanly, start it again:
#             the backlog recovered, recovery's elapsed_ms (from the log
#             line "durable state recovered"), and the RSS after recovery
#             and at its peak (VmHWM)
#   fanout    persistent 1 KiB messages with confirms through a fanout
#             exchange to 10 durable queues, each with a consumer (manual
#             ack): publish rate, and bytes the broker wrote to disk per
#             published message (write_bytes of /proc/PID/io)
#   pinned    persistent 1 KiB messages with confirms through one durable
#             queue and its consumer for PINNED_S seconds while
#             hold_messages.py keeps one message every 0.25 s unacknowledged
#             in another: the bytes written, the bytes held, and the data
#             directory's size 1 to 6 s after the flow stops (without
#             compaction, every segment would stay)
#
# Usage: benchmarks/storage.sh [BIN] [SCENARIO...]   (default: all four)
# Environment:
#   BACKLOG_COUNT      messages of the backlog scenario (default 10000000)
#   RESTART_PUBLISH_S  seconds of publishing before the restart (default 60)
#   FANOUT_S           seconds of the fanout scenario (default 20)
#   PINNED_S           seconds of the pinned scenario (default 60)
#   PYTHON             a Python with pika (default .venv/bin/python, made by
#                      scripts/test.sh; created here with pika if missing)
#   BENCH              warren-bench binary (default target/release/warren-bench)
#   WORK               scratch directory (default a fresh one under /tmp)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BIN="${1:-target/release/warren}"
shift || true
SCENARIOS=("$@")
[ ${#SCENARIOS[@]} -gt 0 ] || SCENARIOS=(backlog restart fanout pinned)
BENCH="${BENCH:-target/release/warren-bench}"
BACKLOG_COUNT="${BACKLOG_COUNT:-10000000}"
RESTART_PUBLISH_S="${RESTART_PUBLISH_S:-60}"
FANOUT_S="${FANOUT_S:-20}"
PINNED_S="${PINNED_S:-60}"
PYTHON="${PYTHON:-.venv/bin/python}"
WORK="${WORK:-$(mktemp -d /tmp/warren-storage.XXXXXX)}"
mkdir -p "$WORK"
AMQP_PORT=26692
HTTP_PORT=26693
URL="amqp://guest:guest@127.0.0.1:$AMQP_PORT/%2f"

BROKER_PID=
start_broker() {
    "$BIN" serve --amqp-listen "127.0.0.1:$AMQP_PORT" --http-listen "127.0.0.1:$HTTP_PORT" \
        --data-dir "$WORK/data" >>"$WORK/broker.log" 2>&1 &
    BROKER_PID=$!
    for _ in $(seq 1 600); do
        (exec 3<>"/dev/tcp/127.0.0.1/$AMQP_PORT") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "the broker did not start; see $WORK/broker.log" >&2
    exit 1
}

stop_broker() {
    kill -TERM "$BROKER_PID"
    wait "$BROKER_PID" 2>/dev/null || true
}

rss_mib() {
    awk '/^VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"
}

peak_rss_mib() {
    awk '/^VmHWM/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"
}

written_bytes() {
    awk '/^write_bytes/ {print $2}' "/proc/$1/io"
}

fresh() {
    rm -rf "$WORK/data"
    : >"$WORK/broker.log"
}

backlog() {
    fresh
    start_broker
    "$BENCH" --url "$URL" --broker-pid "$BROKER_PID" --producers 1 --consumers 1 \
        --size 16 --persistent --confirm 256 --ack manual --prefetch 100 \
        --prefill "$BACKLOG_COUNT" --drain-timeout 1800 >"$WORK/backlog.txt"
    grep -E "prefill|drain|broker RSS" "$WORK/backlog.txt" | sed 's/^ */  /'
    for second in 1 2 3 4 5 6; do
        sleep 1
        echo "  $second s after the drain: data directory $(du -sm "$WORK/data" | cut -f1) MiB," \
             "RSS $(rss_mib "$BROKER_PID") MiB"
    done
    stop_broker
}

restart() {
    fresh
    start_broker
    "$BENCH" --url "$URL" --producers 1 --consumers 0 --size 16 --persistent \
        --confirm 256 --duration "$RESTART_PUBLISH_S" >"$WORK/restart.txt"
    echo "  published: $(grep -E '^ *publish' "$WORK/restart.txt" | head -1 | sed 's/^ *//')"
    echo "  RSS before the restart: $(rss_mib "$BROKER_PID") MiB;" \
         "data directory $(du -sm "$WORK/data" | cut -f1) MiB"
    stop_broker
    : >"$WORK/broker.log"
    local started
    started=$(date +%s.%N)
    start_broker
    local ready
    ready=$(date +%s.%N)
    grep -o "durable state recovered.*" "$WORK/broker.log" | sed 's/^/  /'
    echo "  start to accepting connections: $(awk "BEGIN {printf \"%.2f\", $ready - $started}") s;" \
         "RSS after recovery $(rss_mib "$BROKER_PID") MiB, peak during it $(peak_rss_mib "$BROKER_PID") MiB"
    stop_broker
}

fanout() {
    fresh
    start_broker
    local before after
    before=$(written_bytes "$BROKER_PID")
    "$BENCH" --url "$URL" --broker-pid "$BROKER_PID" --producers 1 --consumers 10 \
        --queues 10 --exchange-fanout --size 1024 --persistent --confirm 256 \
        --ack manual --prefetch 100 --duration "$FANOUT_S" >"$WORK/fanout.txt"
    after=$(written_bytes "$BROKER_PID")
    local published
    published=$(grep -E '^ *publish' "$WORK/fanout.txt" | head -1 | grep -oE '\([0-9,]+ messages' | tr -dc '0-9')
    grep -E "^ *(publish|consume|deliver)" "$WORK/fanout.txt" | sed 's/^ */  /'
    if [ -n "$published" ] && [ "$published" -gt 0 ]; then
        echo "  written: $((after - before)) bytes for $published messages:" \
             "$(( (after - before) / published )) bytes per message"
    else
        echo "  written: $((after - before)) bytes (message count not found in the report)"
    fi
    stop_broker
}

pinned() {
    if ! "$PYTHON" -c 'import pika' 2>/dev/null; then
        python3 -m venv "$WORK/venv"
        "$WORK/venv/bin/pip" install -q pika
        PYTHON="$WORK/venv/bin/python"
    fi
    fresh
    start_broker
    local before after hold_input holder
    before=$(written_bytes "$BROKER_PID")
    hold_input="$WORK/hold.fifo"
    rm -f "$hold_input"
    mkfifo "$hold_input"
    "$PYTHON" benchmarks/hold_messages.py "$URL" 0.25 "$PINNED_S" 1024 <"$hold_input" >"$WORK/hold.txt" &
    holder=$!
    exec 4>"$hold_input"
    "$BENCH" --url "$URL" --producers 1 --consumers 1 --size 1024 --persistent \
        --confirm 256 --ack manual --prefetch 100 --duration "$PINNED_S" >"$WORK/pinned.txt"
    after=$(written_bytes "$BROKER_PID")
    while ! grep -q holding "$WORK/hold.txt"; do sleep 0.1; done
    grep -E "^ *publish" "$WORK/pinned.txt" | head -1 | sed 's/^ */  flow: /'
    echo "  $(cat "$WORK/hold.txt"); $((after - before)) bytes written to disk"
    for second in 1 2 3 4 5 6; do
        sleep 1
        echo "  $second s after the flow: data directory $(du -sk "$WORK/data/messages" | cut -f1) KiB" \
             "in $(find "$WORK/data/messages" -maxdepth 1 -name '*.seg' | wc -l) segments"
    done
    exec 4>&-
    wait "$holder" || true
    stop_broker
}

echo "Warren storage benchmark: $BIN ($(git rev-parse --short HEAD 2>/dev/null || echo '?')), $(nproc) CPUs"
for scenario in "${SCENARIOS[@]}"; do
    echo "$scenario:"
    "$scenario"
done
echo "scratch: $WORK"
