#!/usr/bin/env bash
# Fuzzes warren-proto's frame decoder and the AMQP connection state machine
# with the cargo-fuzz targets in fuzz/.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# runs each target (all of them when none is named: frame_decoder,
# field_table, content_header, connection) for SECONDS (default 60) and exits non-zero
# if any crashed, printing where the crashing input was written and how to
# replay it. For a long run, an hour a target:
#
#   nice -n 19 scripts/fuzz.sh 3600
#
# Each run starts from a scratch copy of the committed corpus in
# fuzz/corpus/<target> (the inputs fuzz/seed/capture.py recorded from pika,
# plus the minimised finds of hour-long runs), so a run never changes the
# repository; the scratch directory (printed) keeps what the run found. To
# fold the finds of a long run back into the committed corpus:
#
#   cp -n SCRATCH/corpus/TARGET/* DIR/ && cp fuzz/corpus/TARGET/* DIR/
#   (cd fuzz && cargo fuzz cmin TARGET DIR) && cp -n DIR/* fuzz/corpus/TARGET/
#
# cargo-fuzz needs a nightly compiler's -Z flags; on a stable toolchain this
# script sets RUSTC_BOOTSTRAP=1, which unlocks them. FUZZ_SANITIZER picks the
# sanitizer (default: address; "none" builds faster and still catches
# panics, overflows and aborts). FUZZ_JOBS runs that many fuzzing processes
# per target (default 1); libFuzzer then writes each one's log to
# fuzz/fuzz-N.log.
set -euo pipefail

seconds="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(frame_decoder field_table content_header connection)
fi
sanitizer="${FUZZ_SANITIZER:-address}"
jobs="${FUZZ_JOBS:-1}"
parallel=()
if [ "$jobs" -gt 1 ]; then
    parallel=(-jobs="$jobs" -workers="$jobs")
fi

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root/fuzz"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi
if ! rustc --version | grep -q nightly; then
    export RUSTC_BOOTSTRAP=1
fi

cargo fuzz build --sanitizer "$sanitizer"

scratch="$(mktemp -d "${TMPDIR:-/tmp}/warren-fuzz.XXXXXX")"
echo "scratch corpora and logs in $scratch"
failed=0
for target in "${targets[@]}"; do
    corpus="$scratch/corpus/$target"
    artifacts="$scratch/artifacts/$target"
    mkdir -p "$corpus" "$artifacts"
    cp -r "corpus/$target/." "$corpus/"
    log="$scratch/$target.log"
    echo "== $target: ${seconds}s from $(ls "$corpus" | wc -l) seeds"
    status=0
    cargo fuzz run --sanitizer "$sanitizer" "$target" "$corpus" -- \
        -max_total_time="$seconds" \
        -artifact_prefix="$artifacts/" \
        "${parallel[@]}" \
        -print_final_stats=1 >"$log" 2>&1 || status=$?
    grep -E '^stat::number_of_executed_units|^stat::peak_rss_mb|Done [0-9]+ runs' "$log" || true
    crashes=("$artifacts"/*)
    if [ "$status" -ne 0 ] || [ -e "${crashes[0]}" ]; then
        failed=1
        echo "!! $target failed (exit $status); the end of its log, $log:"
        tail -n 40 "$log"
        for crash in "${crashes[@]}"; do
            [ -e "$crash" ] || continue
            echo "!! crashing input: $crash"
            echo "   replay: (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer $sanitizer $target $crash)"
        done
    fi
done
exit "$failed"
